"""Shared pytest set-up, kept minimal.

- Tests marked ``cuda`` are skipped on machines without an NVIDIA GPU.
- Every test runs with one torch thread: the models are tiny, CI has 2 cores, and OpenMP spinning under contention
  makes such tests several times slower.
- Triton's CPU interpreter works only if ``triton.language`` is first imported with ``TRITON_INTERPRET=1``. Without a
  GPU, import it that way here, then restore the variable: only tests that set it (the kernel tests, through
  ``monkeypatch``) run kernels in the interpreter; every other test keeps the plain-PyTorch references.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked 'cuda'); run on a GPU machine: pytest -m cuda")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fused(monkeypatch):
    """Force the Triton path on CPU tensors, through Triton's interpreter (the kernel tests)."""
    from alphagrpo.kernels import use_fused
    from alphagrpo.kernels.dispatch import interpreter_ready
    if not interpreter_ready():
        pytest.skip("Triton's interpreter needs TRITON_INTERPRET=1 before triton is imported (conftest does this "
                    "on machines without CUDA)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_fused(True):
        yield
