import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers (_numerics, cases)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Without a GPU the Triton kernels (impl="triton") run in Triton's interpreter on the CPU; it is
# chosen when triton is first imported, so it is set here, before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- a benchmarks/ script loaded by path, with one torch thread (its tests run small calls) ----------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """Generator for a module-scoped fixture: ``yield from load_benchmark("approx_speed")`` yields
    benchmarks/<name>.py as a module, torch on one thread (small calls: fastest, and it spares a
    loaded machine); both are undone afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        torch.set_num_threads(threads)


# -- benchmarks/gpu.py and its modules, loaded as the device machine runs them (test_gpu_benchmark.py,
# test_gpu_tune.py) ----------------------------------------------------------------------------------

GPU_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    """gpu.py loaded by path, as the device runs it: it puts benchmarks/ on sys.path for its modules."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark", GPU_BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _module_fixture(name: str, module: str):
    """A fixture ``name``: benchmarks/<module>.py, imported by name (gpu.py put benchmarks/ on sys.path)."""
    @pytest.fixture(scope="module", name=name)
    def fixture(gpu):
        return importlib.import_module(module)
    return fixture


peers = _module_fixture("peers", "gpu_peers")
sweep = _module_fixture("sweep", "gpu_tune")
verdicts = _module_fixture("verdicts", "gpu_tune_report")
warm = _module_fixture("warm", "gpu_warm")
steps = _module_fixture("steps", "gpu_steps")
overhead = _module_fixture("overhead", "gpu_overhead")
pb = _module_fixture("pb", "plan_build")
