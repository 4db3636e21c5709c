"""The connector's staging rows through the daemon client: a 2-D buffer moves in one native copy
(kvbm.client._rows); a list of rows, other dtypes and strided views take the row-by-row path.
Every loaded byte is checked against what was stored, one-shot (<= the scratch), two-phase and
pipelined (more than a batch)."""

from __future__ import annotations

import numpy as np
import pytest

from servedaemon import LAYOUT, NB, Served, make_keys

torch = pytest.importorskip("torch")


@pytest.fixture
def daemon(tmp_path):
    d = Served(tmp_path, "rows", tiers=[{"name": "g2", "capacity": 512, "eviction": "lru", "storage": "host"}],
               daemon={"window_mib": 1}).start()  # a 64-slot window: batches of 32, so 100 keys pipeline
    yield d
    d.stop()


@pytest.mark.parametrize("n", [3, 31, 100])
def test_staging_rows_round_trip_byte_for_byte(daemon, n):
    from kvbm.client import _rows
    from kvbm.connectors.daemon_backend import DaemonBackend

    backend = DaemonBackend.connect(daemon.address, LAYOUT, "tiny")
    try:
        keys = make_keys(f"rows{n}", n)
        src = torch.from_numpy(np.random.default_rng(n).integers(0, 256, (n, NB), dtype=np.uint8))
        assert _rows(src, NB) is not None  # one copy for the whole batch
        assert backend.start_store(keys, src).result(timeout=60) == n
        rows = torch.zeros((n, NB), dtype=torch.uint8)
        assert backend.loaded(backend.start_load(keys, rows)) == n and torch.equal(rows, src)
        halves = torch.zeros((n, NB // 2), dtype=torch.bfloat16)  # rows of another dtype
        assert backend.loaded(backend.start_load(keys, halves)) == n
        assert torch.equal(halves.view(torch.uint8), src)
        listed = [torch.zeros(NB, dtype=torch.uint8) for _ in range(n)]  # a list: row by row
        assert backend.loaded(backend.start_load(keys, listed)) == n
        assert all(torch.equal(a, b) for a, b in zip(listed, src))
        wide = torch.zeros((n, 2 * NB), dtype=torch.uint8)
        view = wide[:, :NB]  # strided rows: not one buffer, row by row, nothing outside them written
        assert _rows(view, NB) is None
        assert backend.loaded(backend.start_load(keys, view)) == n
        assert torch.equal(view, src) and not wide[:, NB:].any()
        assert _rows(np.zeros((n, NB + 1), np.uint8), NB) is None  # not whole blocks
    finally:
        backend.close()
