"""How many examples a hypothesis test runs: its own small count in CI, more on request.

    KVBM_HYPOTHESIS_EXAMPLES=2000 python -m pytest tests/test_manager_atomic.py

runs 2,000 examples in every test that asks `examples(ci)` (and every test that does not pin
its own count, through the "thorough" profile in tests/conftest.py).
"""

from __future__ import annotations

import os

ENV = "KVBM_HYPOTHESIS_EXAMPLES"


def examples(ci: int) -> int:
    """The example count for a test whose CI count is `ci`."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return ci
    try:
        n = int(raw)
    except ValueError:
        raise SystemExit(f"{ENV}={raw!r} is not a whole number; set it to e.g. 2000, or unset it") from None
    if n < 1:
        raise SystemExit(f"{ENV}={n} must be at least 1; set it to e.g. 2000, or unset it")
    return n
