"""
Keep the Japanese tutorials (tutorials/ja/) in step with the English ones: one code, two languages.

    python scripts/sync_tutorials.py           # rewrite tutorials/ja/*.ipynb from the English
    python scripts/sync_tutorials.py --check   # exit 1, listing what has drifted (as the tests)

A Japanese notebook has the English notebook's cells, in the same order and with the same ids:
- code cells are the English ones, character for character, except inside string literals,
  where the fragments listed in the notebook's message table (tutorials/ja/messages/NAME.json,
  English fragment -> Japanese) are replaced: the titles, labels and printed text a reader sees.
  Nothing outside a string literal can differ, so the code is maintained once, in English;
- markdown cells are the Japanese translation, kept from the Japanese notebook by cell id. A cell
  new in English arrives in English under the marker UNTRANSLATED, for a translator to replace.
"""

import argparse
import copy
import io
import json
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGLISH = ROOT / "tutorials"
JAPANESE = ENGLISH / "ja"
MESSAGES = JAPANESE / "messages"
UNTRANSLATED = "<!-- UNTRANSLATED: 未翻訳 -->"


def notebooks():
    return sorted(ENGLISH.glob("[0-9][0-9]_*.ipynb"))


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def dumps(notebook: dict) -> str:
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def source(cell: dict) -> str:
    text = cell["source"]
    return "".join(text) if isinstance(text, list) else text


def lines(text: str) -> list:
    return text.splitlines(keepends=True)


def messages(name: str) -> dict:
    path = MESSAGES / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def literal_spans(code: str) -> list:
    """(begin, end, is_f_string) of every string literal in the code, as offsets: a STRING token,
    or on Python 3.12+ an f-string from its FSTRING_START to its FSTRING_END."""
    starts = [0]
    for line in lines(code):
        starts.append(starts[-1] + len(line))
    offset = lambda point: starts[point[0] - 1] + point[1]  # noqa: E731
    spans, depth, opened = [], 0, None
    fstring_start = getattr(tokenize, "FSTRING_START", None)
    fstring_end = getattr(tokenize, "FSTRING_END", None)
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        if token.type == fstring_start:
            depth += 1
            opened = opened or token.start
        elif token.type == fstring_end:
            depth -= 1
            if depth == 0:
                spans.append((offset(opened), offset(token.end), True))
                opened = None
        elif token.type == tokenize.STRING and depth == 0:
            prefix = token.string[: token.string.index(token.string[-1])].lower()
            spans.append((offset(token.start), offset(token.end), "f" in prefix))
    return spans


def text_parts(literal: str, is_f_string: bool) -> list:
    """(begin, end) of the literal text of a string literal: all of it, or for an f-string the
    text outside its replacement fields ``{...}`` (whose expressions are code, not text)."""
    if not is_f_string:
        return [(0, len(literal))]
    parts, depth, start, i = [], 0, 0, 0
    while i < len(literal):
        pair = literal[i : i + 2]
        if depth == 0 and pair in ("{{", "}}"):
            i += 2
            continue
        if literal[i] == "{":
            if depth == 0:
                parts.append((start, i))
            depth += 1
        elif literal[i] == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                start = i + 1
        i += 1
    parts.append((start, len(literal)))
    return parts


def translate_code(code: str, table: dict, used: set) -> str:
    """The code with each table fragment replaced in the text of its string literals only (not
    in an f-string's expressions; longest fragment first, in one pass, so a Japanese value is
    never replaced again); ``used`` collects the fragments met."""
    if not table:
        return code
    pattern = re.compile("|".join(re.escape(k) for k in sorted(table, key=len, reverse=True)))

    def swap(match):
        used.add(match.group(0))
        return table[match.group(0)]

    pieces, position = [], 0
    for begin, end, is_f_string in literal_spans(code):
        literal = code[begin:end]
        for part_begin, part_end in text_parts(literal, is_f_string):
            pieces.append(code[position : begin + part_begin])
            pieces.append(pattern.sub(swap, literal[part_begin:part_end]))
            position = begin + part_end
    return "".join(pieces) + code[position:]


def twin(english_path: Path) -> tuple:
    """The Japanese notebook as it should be, and the problems found on the way."""
    name = english_path.stem
    english = read(english_path)
    japanese_path = JAPANESE / english_path.name
    japanese = read(japanese_path) if japanese_path.exists() else {"cells": []}
    translated = {c.get("id"): c for c in japanese["cells"] if c["cell_type"] == "markdown"}
    table, used, problems = messages(name), set(), []
    out = copy.deepcopy(english)
    for cell in out["cells"]:
        if cell["cell_type"] == "code":
            cell["source"] = lines(translate_code(source(cell), table, used))
        elif cell["cell_type"] == "markdown":
            kept = translated.get(cell.get("id"))
            if kept is None or source(kept).startswith(UNTRANSLATED):
                problems.append(f"{name}: markdown cell {cell.get('id')} is not translated")
            if kept is None:  # new in English: arrives in English, marked
                cell["source"] = lines(f"{UNTRANSLATED}\n{source(cell)}")
            else:
                cell["source"] = kept["source"]
    for fragment in sorted(set(table) - used):
        problems.append(f"{name}: message {fragment!r} is in no string literal of the code")
    dropped = set(translated) - {c.get("id") for c in out["cells"]}
    problems += [f"{name}: cell {i} is gone from the English notebook" for i in sorted(dropped)]
    return out, problems


def sync(check: bool) -> list:
    """Write (or, with check, only compare) every Japanese twin; returns the problems."""
    problems = []
    expected = {p.name for p in notebooks()}
    for stray in sorted(JAPANESE.glob("*.ipynb")):
        if stray.name not in expected:
            problems.append(f"{stray.name}: a Japanese notebook with no English one")
    for stray in sorted(MESSAGES.glob("*.json")):
        if f"{stray.stem}.ipynb" not in expected:
            problems.append(f"{stray.name}: a message table with no notebook")
    for path in notebooks():
        notebook, found = twin(path)
        problems += found
        target = JAPANESE / path.name
        text = dumps(notebook)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            if check:
                problems.append(f"{path.stem}: the Japanese notebook differs from its sync")
            else:
                target.write_text(text, encoding="utf-8")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on drift")
    args = parser.parse_args(argv)
    problems = sync(check=args.check)
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.check and problems:
        print(
            "run: python scripts/sync_tutorials.py, then translate what it marks", file=sys.stderr
        )
    return 1 if problems and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
