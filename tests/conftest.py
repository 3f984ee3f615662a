"""Keep test runs out of the user's kernel cache: one fresh cache directory per test session, removed at its end
(unless ATTNGEN_CACHE_DIR was set: a prewarmed cache is the caller's to keep)."""

import atexit
import os
import shutil
import tempfile

import pytest

if "ATTNGEN_CACHE_DIR" not in os.environ:
    os.environ["ATTNGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="attngen-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ATTNGEN_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's many small CPU tensor operations on one thread: the pool only adds overhead there, and stalls
    on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
