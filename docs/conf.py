"""Sphinx configuration of the documentation site: the tutorials executed (myst-nb), the README
pages, and an API reference generated from the docstrings (autosummary).

Build it with ``bash scripts/docs.sh`` (quick mode, the default) or ``bash scripts/docs.sh
--full``. The tutorials are stored without outputs; the build copies them from ``tutorials/``
into ``docs/tutorials/`` (not tracked) and executes them there, so outputs and figures live in
the built pages only.

Environment read here (``scripts/docs.sh`` sets it):
  ZOO_QUICK=1            the notebooks' quick mode (less data, fewer epochs)
  ZOO_DOCS_EXECUTE       myst-nb's execution mode: "force" (default) or "cache"
  ZOO_DOCS_NOTEBOOKS     comma-separated notebook numbers to build (others are left out), for a
                         quick look at one page
  ZOO_DOCS_JAPANESE      "pages": build the Japanese tutorials' pages without running them (the
                         tests do: their code is the English code, which they run)
"""

import datetime
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

project = "The probabilistic-programming model zoo"
author = "The model zoo developers"
copyright = f"{datetime.date.today().year}, {author}"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",  # the Args: / Attributes: sections of the drivers' docstrings
    "sphinx.ext.viewcode",
]


def _copy_tutorials(source: Path, target: Path, extra=(), pages=(), keep=()) -> None:
    """Copy a folder of tutorials into the docs: its notebooks, its ``extra`` files, and its
    README as ``index.md`` with a hidden toctree of ``pages`` and the notebooks, in their order.
    Only files whose bytes changed are rewritten (an incremental build re-reads only those); a
    file gone from ``source`` is removed (``keep`` names subfolders that are not)."""
    target.mkdir(parents=True, exist_ok=True)
    copied = set(keep)
    for path in sorted(source.glob("*.ipynb")) + [source / name for name in extra + ("README.md",)]:
        destination = target / ("index.md" if path.name == "README.md" else path.name)
        copied.add(destination.name)
        content = path.read_bytes()
        if path.name == "README.md":
            entries = "\n".join((*pages, "[0-9][0-9]_*"))
            content += f"\n```{{toctree}}\n:hidden:\n:glob:\n\n{entries}\n```\n".encode()
        if not destination.exists() or destination.read_bytes() != content:
            destination.write_bytes(content)
    for stale in target.iterdir():
        if stale.name not in copied:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def _sync_tutorials() -> list:
    """The tutorials into docs/tutorials/ and the Japanese ones (with their glossary) into
    docs/tutorials/ja/. Returns the notebooks ZOO_DOCS_NOTEBOOKS leaves out, as patterns for
    exclude_patterns."""
    target = HERE / "tutorials"
    _copy_tutorials(ROOT / "tutorials", target, keep=("ja",))
    _copy_tutorials(ROOT / "tutorials" / "ja", target / "ja", ("glossary.md",), ("glossary",))
    wanted = {
        f"{int(n):02d}" for n in os.environ.get("ZOO_DOCS_NOTEBOOKS", "").split(",") if n.strip()
    }
    return [
        f"tutorials/{folder}{p.name}"
        for folder in ("", "ja/")
        for p in sorted((target / folder).glob("[0-9][0-9]_*.ipynb"))
        if wanted and p.name[:2] not in wanted
    ]


def _sync_benchmarks() -> None:
    """The measured results (benchmarks/results/*.md and their plots) as pages of their own,
    with an index that lists them; regenerated on every build, like docs/tutorials/."""
    source, target = ROOT / "benchmarks" / "results", HERE / "benchmarks"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for path in sorted(source.glob("*.md")) + sorted(source.glob("*.png")):
        shutil.copyfile(path, target / path.name)
    (target / "index.md").write_text(
        "# Benchmarks\n\n"
        "Speed and quality measured by the scripts in `benchmarks/` (each writes a JSON and a "
        "Markdown file to `benchmarks/results/`; the pages below are those files). Each page "
        "says how it was run, on which machine, and in what state (idle or busy).\n\n"
        "```{toctree}\n:glob:\n:maxdepth: 1\n\n*\n```\n"
    )


_sync_benchmarks()
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
exclude_patterns += _sync_tutorials()
# ZOO_DOCS_JAPANESE=pages: the Japanese tutorials built as pages, not run (as the tests do)
nb_execution_excludepatterns = (
    ["tutorials/ja/*"] if os.environ.get("ZOO_DOCS_JAPANESE") == "pages" else []
)
# a page that links to a notebook left out by ZOO_DOCS_NOTEBOOKS is not an error then
suppress_warnings = ["myst.xref_missing"] if os.environ.get("ZOO_DOCS_NOTEBOOKS") else []

QUICK = os.environ.get("ZOO_QUICK", "") not in ("", "0")
MODE = (
    "quick mode (ZOO_QUICK=1: less data, fewer epochs;"
    " `bash scripts/docs.sh --full` builds the full run)"
    if QUICK
    else "full mode"
)

# --- myst-nb: execute every notebook at build time; outputs go to the pages, never back into
# tutorials/ ---
nb_execution_mode = os.environ.get("ZOO_DOCS_EXECUTE", "force")
nb_execution_timeout = -1  # no per-cell limit: a busy machine must not fail a quick cell
nb_execution_in_temp = True  # files a notebook writes go to a temporary folder
nb_execution_allow_errors = False
nb_execution_raise_on_error = False  # a failing notebook is a warning (an error under -W), and
nb_execution_show_tb = True  # its page still shows where it failed, with the traceback
# one cache per mode: a quick run's outputs never stand in for a full run's
nb_execution_cache_path = str(HERE / "_build" / ("quick" if QUICK else "full") / ".jupyter_cache")
nb_merge_streams = True
nb_output_stderr = "show"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_update_mathjax = False  # its MathJax 3 settings would replace the MathJax 2 object below
myst_heading_anchors = 3

# --- the API reference, from the docstrings ---
autosummary_generate = True
napoleon_use_ivar = True  # Attributes: as fields of the class, not second descriptions
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"

# --- the pages ---
html_theme = "sphinx_book_theme"
html_title = "Model zoo"
# MathJax from the package index (the copy Jupyter serves), not from a CDN, so that the formulas
# render where the site is read offline, as on the course's machines
import jupyter_server_mathjax  # noqa: E402

_mathjax = HERE / "_build" / "_static_mathjax"
if not (_mathjax / "mathjax" / "MathJax.js").exists():
    shutil.copytree(
        Path(jupyter_server_mathjax.__file__).parent / "static",
        _mathjax / "mathjax",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("png"),  # image fonts: the web fonts are used
    )
html_static_path = ["_static", str(_mathjax)]
html_css_files = ["zoo.css"]
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
mathjax2_config = {
    "tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]]},
    "HTML-CSS": {"availableFonts": ["TeX"], "imageFont": None},
}
html_theme_options = {
    "show_toc_level": 2,
    "announcement": f"Notebooks executed at build time ({datetime.date.today()}) in {MODE}.",
    "use_download_button": True,
}
html_last_updated_fmt = "%Y-%m-%d"
