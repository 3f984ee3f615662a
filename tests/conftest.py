"""Keep test runs out of the user's kernel cache: one fresh cache directory per test session, removed at its end
(unless ATTNGEN_CACHE_DIR was set: a prewarmed cache is the caller's to keep)."""

import atexit
import os
import shutil
import tempfile

if "ATTNGEN_CACHE_DIR" not in os.environ:
    os.environ["ATTNGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="attngen-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ATTNGEN_CACHE_DIR"], ignore_errors=True)
