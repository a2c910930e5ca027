"""The Japanese tutorials (tutorials/ja/): one code, two languages, and one vocabulary.

- every English notebook has a Japanese twin whose cells match it one for one, whose code is the
  English code with only the message table's fragments replaced inside string literals (the
  sync script's check, and an independent comparison of the token streams), and whose prose is
  translated;
- the glossary (tutorials/ja/glossary.md) is followed: a term is spelled its way everywhere, and
  is given with its English term in parentheses at its first use, in the notebook the glossary
  names, which is the first of the reading order to use it;
- figures can draw Japanese text (zoo.plots.japanese_font).
The English run of the notebooks (tests/test_docs.py) covers the Japanese code: it is the same.
"""

import io
import json
import re
import shutil
import sys
import tokenize
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import sync_tutorials  # noqa: E402

JAPANESE_TEXT = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")  # kana and kanji
NOTEBOOKS = sync_tutorials.notebooks()
JA = sync_tutorials.JAPANESE


def _cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def reading_order():
    """The notebooks in the order the course reads them: by number, with 17 after 6."""
    numbered = {int(p.name[:2]): p for p in NOTEBOOKS}
    order = [n for n in sorted(numbered) if n != 17]
    if 17 in numbered:
        order.insert(order.index(6) + 1, 17)
    return [numbered[n] for n in order]


def test_every_notebook_has_a_japanese_twin_in_step_with_it():
    problems = sync_tutorials.sync(check=True)
    assert not problems, "\n".join(problems)


def test_the_check_catches_code_edited_in_the_japanese_notebook(tmp_path, monkeypatch):
    copy = tmp_path / "ja"
    shutil.copytree(JA, copy)
    monkeypatch.setattr(sync_tutorials, "JAPANESE", copy)
    monkeypatch.setattr(sync_tutorials, "MESSAGES", copy / "messages")
    path = copy / NOTEBOOKS[0].name
    notebook = json.loads(path.read_text(encoding="utf-8"))
    code = next(c for c in notebook["cells"] if c["cell_type"] == "code")
    code["source"] = ["x = 1  # edited here, not in English\n"] + code["source"]
    path.write_text(sync_tutorials.dumps(notebook), encoding="utf-8")
    assert any("differs from its sync" in p for p in sync_tutorials.sync(check=True))


def _tokens(code):
    return [
        (t.type, t.string)
        for t in tokenize.generate_tokens(io.StringIO(code).readline)
        if t.type not in (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", None))
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_japanese_code_is_the_english_code_and_its_prose_is_japanese(path):
    english, japanese = _cells(path), _cells(JA / path.name)
    assert [(c["cell_type"], c.get("id")) for c in english] == [
        (c["cell_type"], c.get("id")) for c in japanese
    ]
    for en, ja in zip(english, japanese):
        en_text, ja_text = "".join(en["source"]), "".join(ja["source"])
        if en["cell_type"] == "code":
            # outside string literals nothing differs, comments included
            assert _tokens(en_text) == _tokens(ja_text), f"{path.name}, cell {en.get('id')}"
        else:
            assert JAPANESE_TEXT.search(ja_text), f"{path.name}, cell {en.get('id')} untranslated"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_message_changes_its_text_and_the_table_is_japanese(path):
    table = sync_tutorials.messages(path.stem)
    assert table, f"{path.stem}: no message table (tutorials/ja/messages/{path.stem}.json)"
    for english, japanese in table.items():
        assert japanese != english, f"{path.stem}: {english!r} is left as it is"
    assert JAPANESE_TEXT.search("".join(table.values())), path.stem


def glossary():
    """Rows of tutorials/ja/glossary.md: (Japanese, English, symbol, first notebook number,
    spellings to avoid)."""
    rows = []
    for line in (JA / "glossary.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[3].isdigit():
            avoid = [v.strip() for v in cells[4].split("、") if v.strip() and v.strip() != "-"]
            rows.append((cells[0], cells[1], cells[2], int(cells[3]), avoid))
    return rows


def _japanese_text(path):
    """What a reader of a Japanese notebook reads, headings aside (a title names a term before
    the text introduces it): its prose and its messages."""
    prose = "\n".join(
        line
        for c in _cells(JA / path.name)
        if c["cell_type"] == "markdown"
        for line in "".join(c["source"]).splitlines()
        if not line.lstrip().startswith("#")
    )
    return prose + "\n" + "\n".join(sync_tutorials.messages(path.stem).values())


def test_the_glossary_lists_the_course_terms():
    terms = {row[0] for row in glossary()}
    for term in (
        "生成モデル",
        "潜在変数",
        "負担率",
        "EMアルゴリズム",
        "変分下界",
        "事後分布の崩壊",
    ):
        assert term in terms, term
    assert len(terms) >= 30


@pytest.mark.parametrize("row", glossary(), ids=[row[1] for row in glossary()])
def test_each_term_is_spelled_the_glossarys_way_and_introduced_where_it_says(row):
    term, english, _, first, avoid = row
    order = reading_order()
    texts = {p: _japanese_text(p) for p in order}
    for path, text in texts.items():
        for variant in avoid:
            assert variant not in text, f"{path.name} writes {variant!r}: the glossary has {term!r}"
    first_path = next(p for p in order if int(p.name[:2]) == first)
    before = order[: order.index(first_path)]
    used_before = [p.name for p in before if term in texts[p]]
    assert not used_before, f"{term!r} is used before notebook {first}: {used_before}"
    text = texts[first_path]
    assert term in text, f"{term!r} does not appear in notebook {first}"
    at = text.index(term) + len(term)
    assert re.match(rf"\**\s*[（(][^)）]*{re.escape(english)}", text[at : at + 80], re.I), (
        f"notebook {first}: the first {term!r} is not followed by ({english})"
    )


def test_japanese_readme_lists_every_notebook_and_the_glossary():
    readme = (JA / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f"({path.name})" in readme, f"{path.name} missing from tutorials/ja/README.md"
    assert "(glossary.md)" in readme and JAPANESE_TEXT.search(readme)


def test_figures_draw_japanese_text_without_missing_glyphs(tmp_path):
    """With pytest's warnings as errors, a glyph missing from every font fails the test: the
    font zoo.plots adds is what draws the Japanese (without it, DejaVu Sans lacks the glyphs)."""
    from zoo import plots

    family = plots.japanese_font()
    assert family is not None and family in matplotlib.rcParams["font.family"]
    assert matplotlib.rcParams["font.family"][0] != family  # Latin text keeps its font
    fig, ax = matplotlib.pyplot.subplots(figsize=(3, 2))
    ax.set(title="変分下界の推移 (ELBO)", xlabel="エポック", ylabel="対数尤度")
    fig.savefig(tmp_path / "ja.png")
    matplotlib.pyplot.close(fig)


def test_without_a_japanese_font_the_zoo_says_how_to_get_one(monkeypatch):
    from zoo import plots

    monkeypatch.setattr(plots.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(plots.font_manager.fontManager, "ttflist", [])
    monkeypatch.setitem(matplotlib.rcParams, "font.family", ["sans-serif"])
    with pytest.warns(UserWarning, match="pip install matplotlib-fontja"):
        assert plots.japanese_font() is None
    assert matplotlib.rcParams["font.family"] == ["sans-serif"]  # left as it was


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_japanese_inside_mathtext(path):
    """matplotlib draws a string with $...$ in it by mathtext, whose plain-text font has no
    fallback: Japanese there would come out as empty boxes, so such strings stay as they are."""
    for cell in _cells(JA / path.name):
        if cell["cell_type"] != "code":
            continue
        code = "".join(cell["source"])
        for begin, end, _ in sync_tutorials.literal_spans(code):
            literal = code[begin:end]
            assert not (literal.count("$") >= 2 and JAPANESE_TEXT.search(literal)), literal
