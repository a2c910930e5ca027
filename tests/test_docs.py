"""The documentation site builds in quick mode, and every tutorial's page holds what the notebook
made when the build executed it: no error, and every figure, as an image file the page shows.

The build (``scripts/docs.sh``'s command: Sphinx with myst-nb, warnings as errors) is also how
the tests run the tutorials: each notebook is executed top to bottom in a fresh kernel in quick
mode (``ZOO_QUICK=1``), every notebook ending in its checks against known answers, with no
per-cell time limit (a busy machine must not fail a quick cell). The stored notebooks keep no
outputs (``tests/test_tutorials.py``); the outputs live in the built pages only.
"""

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import mnist_available

nbformat = pytest.importorskip("nbformat", reason="the tutorials need the dev extra")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.ipynb"))
PNG = b"\x89PNG\r\n\x1a\n"


def _needs_mnist(path: Path) -> bool:
    notebook = nbformat.read(path, as_version=4)
    return any('"mnist"' in c.source for c in notebook.cells if c.cell_type == "code")


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """Build the site once for the session into a temporary folder; returns (returncode, log,
    html folder, executed-notebooks folder, notebooks built)."""
    out = tmp_path_factory.mktemp("docs")
    built = NOTEBOOKS
    # the Japanese tutorials are built as pages, not run: their code is the English code
    env = dict(os.environ, ZOO_QUICK="1", ZOO_DOCS_EXECUTE="force", ZOO_DOCS_JAPANESE="pages")
    env.pop("ZOO_DOCS_NOTEBOOKS", None)
    env.pop("MPLBACKEND", None)  # Agg would keep the kernels' figures out of the pages
    if not mnist_available() and not os.environ.get("ZOO_REQUIRE_MNIST"):
        built = [p for p in NOTEBOOKS if not _needs_mnist(p)]  # as conftest's requires_mnist
        env["ZOO_DOCS_NOTEBOOKS"] = ",".join(p.name[:2] for p in built)
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q"]
    command += ["-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / "html")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr, out / "html", out / "jupyter_execute", built


def test_site_builds_without_warnings(site):
    returncode, log, html_dir, _, _ = site
    problems = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    problems = [line for line in problems if "IPKernelApp" not in line]  # the kernel's own log
    assert returncode == 0 and not problems, "\n".join(problems) or log[-3000:]
    assert (html_dir / "index.html").exists()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_page_ran_and_shows_its_figures(site, path):
    _, log, html_dir, executed_dir, built = site
    if path not in built:
        pytest.skip("MNIST not in the cache: run `zoo data fetch mnist`")
    executed = executed_dir / "tutorials" / path.name
    assert executed.exists(), f"{path.name} was not executed by the build:\n{log[-3000:]}"
    notebook = nbformat.read(executed, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    for number, cell in enumerate(code, 1):
        for output in cell.outputs:
            assert output.output_type != "error", (
                f"{path.name}, code cell {number} failed: {output.ename}: {output.evalue}\n"
                f"{cell.source[:400]}"
            )
    assert all(c.execution_count is not None for c in code), f"{path.name}: cells left unrun"
    figures = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert figures >= 1, f"{path.name} made no figure"

    page = (html_dir / "tutorials" / path.with_suffix(".html").name).read_text()
    images = [html.unescape(s) for s in re.findall(r'<img[^>]*\bsrc="([^"]+\.png)"', page)]
    shown = [s for s in images if "_images/" in s]  # the notebook's outputs, not the theme's logo
    assert len(shown) == figures, f"{path.name}: {figures} figures made, {len(shown)} on the page"
    for source in shown:
        image = (html_dir / "tutorials" / source).resolve()
        assert image.read_bytes()[:8] == PNG and image.stat().st_size > 1000, source


def test_api_reference_documents_the_drivers_and_models(site):
    _, _, html_dir, _, _ = site
    api = html_dir / "_autosummary"
    for module, name in [
        ("inference.em", "fit"),
        ("inference.svi", "fit"),
        ("inference.reparam", "fit"),
        ("inference.evaluate", "log_likelihood"),
        ("inference.uses", "complete"),
        ("zoo.models.vae", "VAE"),
        ("zoo.registry", "register"),
    ]:
        page = (api / f"{module}.html").read_text()
        assert f'id="{module}.{name}"' in page, f"{module}.{name} missing from the API reference"
    # a driver's arguments render as a parameter list (napoleon), not as one run-on paragraph
    em_page = (api / "inference.em.html").read_text()
    assert re.search(r"Parameters.*?<strong>tol</strong>", em_page, re.S)


def test_every_tutorial_is_in_the_site_navigation(site):
    _, _, html_dir, _, built = site
    index = (html_dir / "tutorials" / "index.html").read_text()
    for path in built:
        assert f'href="{path.stem}.html"' in index, f"{path.name} missing from the tutorials page"


def test_japanese_tutorials_have_their_pages(site):
    _, _, html_dir, _, built = site
    index = (html_dir / "tutorials" / "ja" / "index.html").read_text(encoding="utf-8")
    assert "用語集" in index
    for path in built:
        page = html_dir / "tutorials" / "ja" / path.with_suffix(".html").name
        assert page.exists(), f"no Japanese page for {path.name}"
        assert f'href="{path.stem}.html"' in index, f"{path.name} missing from the Japanese index"
        text = page.read_text(encoding="utf-8")
        assert "このノートで学ぶこと" in text, f"{page.name} is not the Japanese notebook"
