"""Every notebook in notebooks/ runs top to bottom on a slice of the trace, and its checks pass.

Each notebook reads `KVBM_NB_LIMIT` (requests of the bundled trace to replay) and ends with
assertions about its results, so a cell that raises, or a result that goes wrong, fails here.
The kernel is this interpreter (a throwaway `python3` kernelspec pointing at sys.executable),
so it sees the kvbm under test rather than whatever a user-level kernelspec points at.

Needs nbclient, nbformat and ipykernel (the dev extras). Missing, they fail the test with an
install hint rather than skip it: CI installs them, and a silent skip would hide the notebooks.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
LIMIT = os.environ.get("KVBM_NB_LIMIT", "1000")  # ~30 s for all four on two cores
TIMEOUT = 1200  # seconds per cell: a deadline, not a budget (a loaded box runs a cell 10x slower)


def _import_runner():
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError

        import ipykernel  # noqa: F401  (the kernel nbclient starts)
    except ImportError as e:
        pytest.fail(f"the notebook tests need {e.name}: pip install nbclient nbformat ipykernel "
                    f"(or pip install -e '.[dev]')", pytrace=False)
    return nbformat, NotebookClient, CellExecutionError


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, monkeypatch_module):
    """A `python3` kernelspec for this interpreter, first on JUPYTER_PATH; the trace slice."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (kvbm tests)",
        "language": "python",
    }))
    monkeypatch_module.setenv("JUPYTER_PATH", os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("JUPYTER_PATH")])]))
    monkeypatch_module.setenv("KVBM_NB_LIMIT", LIMIT)
    monkeypatch_module.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_policy_comparison.ipynb", "02_tier_sizing.ipynb",
                     "03_write_a_policy.ipynb", "04_priorities.ipynb",
                     "05_what_hitdensity_learns.ipynb"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_env):
    nbformat, NotebookClient, CellExecutionError = _import_runner()
    saved = nbformat.read(path, as_version=4)
    nb = copy.deepcopy(saved)  # run a copy: the saved outputs (full slice) stay as they are
    client = NotebookClient(nb, timeout=TIMEOUT, startup_timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name} (KVBM_NB_LIMIT={LIMIT}): a cell failed\n{e}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s at KVBM_NB_LIMIT={LIMIT}")
    assert any(out.get("data", {}).get("image/png") for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs), f"{path.name} drew no plot"
    assert any("checks passed" in out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs), f"{path.name} did not reach its checks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_saved_notebook_shows_its_plots(path):
    """The committed notebook carries executed outputs, plots included, and no errors."""
    outputs = [out for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"
               for out in cell.get("outputs", [])]
    assert any("image/png" in out.get("data", {}) for out in outputs), f"{path.name}: no saved plot"
    assert not [out for out in outputs if out["output_type"] == "error"], f"{path.name}: saved an error"
