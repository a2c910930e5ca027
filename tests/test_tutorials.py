"""The tutorials run top to bottom from a fresh kernel in quick mode (``ZOO_QUICK=1``: less data,
fewer epochs; every notebook still ends in its checks against known answers), are stored
without outputs, and are all listed in tutorials/README.md."""

import os
from pathlib import Path

import pytest

from tests.conftest import mnist_available

nbformat = pytest.importorskip("nbformat", reason="the tutorials need the dev extra")
nbclient = pytest.importorskip("nbclient", reason="the tutorials need the dev extra")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))


def test_the_notebooks_are_numbered_one_to_n_without_gaps():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert len(NOTEBOOKS) >= 13 and numbers == list(range(1, len(numbers) + 1)), numbers


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{path.name} holds outputs: clear them before committing"
                )


def test_notebooks_use_the_zoo_and_define_no_networks_of_their_own():
    """Each notebook imports the zoo's models or drivers, and none defines a network class:
    the models come from zoo/, not from copies in the tutorials."""
    for path in NOTEBOOKS:
        code = "\n".join(
            c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"
        )
        assert "from zoo" in code or "from inference" in code, path.name
        assert "(nn.Module)" not in code and "(PyroModule)" not in code, path.name


def test_readme_lists_every_notebook():
    readme = (TUTORIALS / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"({path.name})" in readme, f"{path.name} missing from tutorials/README.md"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    notebook = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    if '"mnist"' in code and not mnist_available() and not os.environ.get("ZOO_REQUIRE_MNIST"):
        pytest.skip("MNIST not in the cache: run `zoo data fetch mnist`")  # as conftest does
    # no per-cell limit: on a machine busy with other work a quick cell can take minutes, and
    # CI's own limit still bounds the run (quick mode keeps the cells short on an idle one)
    client = nbclient.NotebookClient(
        notebook,
        timeout=None,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # files a notebook writes go here
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
