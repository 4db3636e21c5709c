import atexit
import os
import shutil
import tempfile

import pytest

from kvbm.cli import BUNDLED
from kvbm.sim.traces import load_trace

# G4's default deployment secret is made under $XDG_CONFIG_HOME/kvbm: the suite, and the
# daemons it starts, use a temporary one (removed at exit), never the user's.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="kvbm-test-config-")
atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def mooncake():
    """The bundled Mooncake conversation trace (a copy of ../shared/traces, with attribution)."""
    return load_trace(BUNDLED["mooncake"])
