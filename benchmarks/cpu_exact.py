"""CPU benchmark of the exact backends (tiled, sdpa, reference); options: --help."""
import sys

from attnkit.bench.cpu import main
sys.exit(main(sys.argv[1:]))
