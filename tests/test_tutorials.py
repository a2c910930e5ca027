"""The tutorials are stored without outputs, use the zoo's models rather than copies, and are all
listed in tutorials/README.md. They are executed by ``tests/test_docs.py``: the documentation
build runs each one top to bottom from a fresh kernel in quick mode (``ZOO_QUICK=1``: less data,
fewer epochs; every notebook still ends in its checks against known answers)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the tutorials need the dev extra")

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
