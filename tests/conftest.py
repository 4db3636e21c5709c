import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase, MultiplexedDatabase, ReadOnlyDatabase

try:
    import kvbm
except ModuleNotFoundError as exc:
    # kvbm imports from the checkout when the install is missing or broken: say what to do
    if not (exc.name or "").startswith("kvbm"):
        raise
    pytest.exit(f"{exc}: install the checkout first: pip install -e \".[dev]\" (later, extras inside the "
                f"brackets: pip install --no-build-isolation -e \".[dev,plot]\")", returncode=4)

from hypothesis_budget import examples  # noqa: E402
from kvbm.cli import BUNDLED  # noqa: E402
from kvbm.sim.traces import load_trace  # noqa: E402

# G4's default deployment secret is made under $XDG_CONFIG_HOME/kvbm: the suite, and the
# daemons it starts, use a temporary one (removed at exit), never the user's.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="kvbm-test-config-")
atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], ignore_errors=True)

# Hypothesis stays random in CI. Failures found earlier are replayed first on every run, from
# tests/.hypothesis-db (committed), which the suite only reads: hypothesis deletes an entry once
# it stops failing, and a run must neither dirty the checkout nor shrink the replay set. What a
# run finds goes to .hypothesis/examples (gitignored, this machine only). To keep a new failure
# forever, before the fix makes it pass (a passing entry is deleted from the local database):
#   - best, an @example beside its test (or, for a state machine, a narrated test of the steps);
#   - or copy the local entries into the committed database and commit them with the fix:
#       cp -rn .hypothesis/examples/. tests/.hypothesis-db/
# KVBM_HYPOTHESIS_EXAMPLES=2000 raises every test's example count (tests/hypothesis_budget.py);
# CI keeps each test's own, small count.
_COMMITTED = ReadOnlyDatabase(DirectoryBasedExampleDatabase(Path(__file__).parent / ".hypothesis-db"))
_LOCAL = DirectoryBasedExampleDatabase(Path(__file__).parent.parent / ".hypothesis" / "examples")
_DB = MultiplexedDatabase(_COMMITTED, _LOCAL)
# No per-example deadline and no too_slow health check: on a loaded box (CI beside other jobs)
# an example's wall time says nothing about the code, so neither may fail a test.
_LOAD_PROOF = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", database=_DB, **_LOAD_PROOF)
settings.register_profile("thorough", database=_DB, max_examples=examples(2000), **_LOAD_PROOF)
settings.load_profile("thorough" if os.environ.get("KVBM_HYPOTHESIS_EXAMPLES")
                      else os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def mooncake():
    """The bundled Mooncake conversation trace (a copy of ../shared/traces, with attribution)."""
    return load_trace(BUNDLED["mooncake"])


def _not_the_installed_copy() -> str | None:
    """`python -m pytest` imports the checkout's kvbm/ first. After a non-editable install
    (`pip install ".[plot]"` over `pip install -e ".[dev]"`) that folder is not what is
    installed, and it has no compiled kvbm._native: the tests still run, the native ones skip."""
    import importlib.metadata
    import json

    from kvbm import ops

    try:
        dist = importlib.metadata.distribution("kvbm-tiered")
    except importlib.metadata.PackageNotFoundError:
        return "kvbm-tiered is not installed; tested from the source folder"
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        return None
    installed = Path(dist.locate_file("kvbm")).resolve()
    if installed == Path(kvbm.__file__).resolve().parent:
        return None
    native = "" if ops.HAVE_NATIVE else ", without kvbm._native (its tests skip)"
    return f"tested the checkout's kvbm/{native}, not the non-editable install in {installed.parent}"


def pytest_terminal_summary(terminalreporter):
    note = _not_the_installed_copy()
    if note:
        terminalreporter.write_line(f"kvbm: {note}; to test this checkout as installed: "
                                    f"pip install --no-build-isolation -e \".[dev]\"", yellow=True)
