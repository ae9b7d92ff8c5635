"""Context-parallel attention over ``torch.distributed``: one sequence sharded across ranks.

The only subpackage of attnkit that uses ``torch.distributed``. See ``docs/distributed.md``.
"""

from .comm import CommStats, ContextParallelError
from .context_parallel import context_parallel_attention
from .core import ContextParallelAttention, parallelize
from .layout import LAYOUTS, local_size, positions, runs, shard, unshard

__all__ = ["CommStats", "ContextParallelError", "LAYOUTS", "context_parallel_attention", "local_size",
           "positions", "runs", "shard", "unshard"]
__all__ += ["ContextParallelAttention", "parallelize"]
