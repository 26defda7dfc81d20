import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import pytest  # noqa: E402
import torch  # noqa: E402

# Triton reads this when it is imported (its own library functions are decorated then): without a GPU
# the fused kernels run on CPU tensors under the interpreter (tests/test_kernels.py). Methods take the
# fused path on CPU only when asked (fused=on), so nothing else changes. On the GPU machine the kernels
# compile (pytest -m gpu).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs the suite on every core with pytest-xdist (one worker per core): each worker then takes
# one thread, as two threads per worker on a busy 2-core machine run far slower than one.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random Llama (fp32, CPU) shared by tests that do not modify it."""
    from harness.models import build_random_model, tiny_config

    return build_random_model(tiny_config("llama"), seed=0)


@pytest.fixture
def fresh_llama(tiny_llama):
    """A private copy (the engine switches a model's attention implementation)."""
    import copy

    return copy.deepcopy(tiny_llama)


@pytest.fixture
def interpret():
    """Skip unless Triton runs on CPU tensors here (TRITON_INTERPRET=1 set above, before Triton's import)."""
    pytest.importorskip("triton")
    from methods.kernels import interpret_mode

    if not interpret_mode():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported")


def pytest_runtest_logreport(report):
    """``KVBENCH_FAILURES=<file>``: each failure's traceback appended to that file as it happens. On the GPU machine
    a call's timeout kills pytest before its summary, and the tracebacks with it (DEVELOPERS.md)."""
    path = os.environ.get("KVBENCH_FAILURES")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):  # xdist: the controller writes, once
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"==== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n\n")
