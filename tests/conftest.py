import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase

try:
    import kvbm  # noqa: F401
except ModuleNotFoundError as exc:
    # `python -m pytest` puts the checkout first on sys.path. After a non-editable install
    # (`pip install ".[plot]"` over `pip install -e ".[dev]"`), `import kvbm` finds the source
    # folder kvbm/, which lacks kvbm.policies (the top-level policies/ folder, mapped in by the
    # install) and the compiled kvbm._native: say what to do instead of a traceback.
    if not (exc.name or "").startswith("kvbm."):
        raise
    pytest.exit(f"{exc}: kvbm is imported from the source folder, which is installed but not in "
                f"editable mode; run: pip install --no-build-isolation -e \".[dev]\" (extras inside "
                f"the brackets, e.g. \".[dev,plot]\")", returncode=4)

from kvbm.cli import BUNDLED  # noqa: E402
from kvbm.sim.traces import load_trace  # noqa: E402

# G4's default deployment secret is made under $XDG_CONFIG_HOME/kvbm: the suite, and the
# daemons it starts, use a temporary one (removed at exit), never the user's.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="kvbm-test-config-")
atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], ignore_errors=True)

# Hypothesis stays random in CI, and every failure it finds is kept in tests/.hypothesis-db
# (committed with the fix), so it is replayed first on every later run, on every machine.
# Known failures also live on as @example. Profiles: "ci" (default: each test's own example
# count), "thorough" (HYPOTHESIS_PROFILE=thorough: 2,000 examples where a test does not pin
# its own count, e.g. tests/test_manager_atomic.py).
_DB = DirectoryBasedExampleDatabase(str(Path(__file__).parent / ".hypothesis-db"))
settings.register_profile("ci", database=_DB)
settings.register_profile("thorough", database=_DB, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def mooncake():
    """The bundled Mooncake conversation trace (a copy of ../shared/traces, with attribution)."""
    return load_trace(BUNDLED["mooncake"])
