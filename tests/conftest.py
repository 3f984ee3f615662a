"""Keep test runs out of the user's kernel cache: one fresh cache directory per test session."""

import os
import tempfile

os.environ.setdefault("ATTNGEN_CACHE_DIR", tempfile.mkdtemp(prefix="attngen-test-cache-"))
