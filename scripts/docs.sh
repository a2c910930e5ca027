#!/usr/bin/env bash
# The documentation site: set-up (the docs extra), data fetch, then Sphinx with myst-nb, which
# executes every tutorial and puts its outputs and figures in the pages (never in tutorials/).
#   bash scripts/docs.sh            quick mode (ZOO_QUICK=1), a few minutes: docs/_build/quick/html
#   bash scripts/docs.sh --full     full mode (an hour or more on 2 CPU cores: notebook 11 alone
#                                   takes about 45 minutes), cached per notebook between builds:
#                                   docs/_build/full/html; --fresh re-executes every notebook
#   ZOO_DOCS_NOTEBOOKS=5,7 bash scripts/docs.sh    only those notebooks (a quick look at a page)
# Open docs/_build/<mode>/html/index.html in a browser.
source "$(dirname "$0")/setup.sh"
if ! python -c "import myst_nb, sphinx_book_theme, jupyter_server_mathjax" 2>/dev/null; then
  python -m pip install -q --disable-pip-version-check -e ".[docs]"
fi
mode=quick
fresh=0
for arg in "$@"; do
  case "$arg" in
    --full) mode=full ;;
    --fresh) fresh=1 ;;
    *) echo "scripts/docs.sh: unknown argument $arg (use --full, --fresh)" >&2; exit 2 ;;
  esac
done
zoo data fetch mnist
out=docs/_build/$mode
if [ "$mode" = quick ]; then
  export ZOO_QUICK=1 ZOO_DOCS_EXECUTE=force
else
  unset ZOO_QUICK
  export ZOO_DOCS_EXECUTE=cache
  if [ "$fresh" = 1 ]; then rm -rf "$out"; fi
fi
# no MPLBACKEND here: the kernels must use their inline backend, which puts figures in the pages
unset MPLBACKEND
# -W: a warning (a notebook that fails, a broken reference, a malformed docstring) fails the
# build; --keep-going builds every page first, so one run lists them all.
python -m sphinx -b html -W --keep-going -d "$out/doctrees" docs "$out/html"
echo "docs: $out/html/index.html"
