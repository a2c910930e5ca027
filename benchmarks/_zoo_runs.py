"""What the quality benchmarks share: run a `zoo` command line, read its metrics, save a table."""

import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo import cli, fitting, runs  # noqa: E402


def fit(command, run: Path, reuse: bool = False) -> dict:
    """Run `zoo <command>` (which writes to ``run``) and return its metrics.json; with
    ``reuse``, a run that the same command already finished is read instead of fitted again."""
    metrics = Path(run) / "metrics.json"
    if reuse and metrics.exists() and runs.is_run(Path(run)):
        recorded = runs.read_config(run).get("command")
        if recorded == "zoo " + " ".join(shlex.quote(a) for a in command):
            print(f"reusing {run}")
            return json.loads(metrics.read_text())
    fitting.fit_run(cli.fit_request(command))  # the pipeline zoo fit runs, as a function
    return json.loads((Path(run) / "metrics.json").read_text())


def save(out, name: str, rows, lines) -> None:
    """Write ``rows`` as JSON and the Markdown ``lines`` plus the commands that made them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    commands = dict.fromkeys(r["command"] for r in rows)  # once each, in order
    lines = [*lines, "\nCommands:\n", *(f"    {c}" for c in commands)]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (name + '.md')}")
