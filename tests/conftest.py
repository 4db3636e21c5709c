import pytest

from kvbm.cli import BUNDLED
from kvbm.sim.traces import load_trace


@pytest.fixture(scope="session")
def mooncake():
    """The bundled Mooncake conversation trace (a copy of ../shared/traces, with attribution)."""
    return load_trace(BUNDLED["mooncake"])
