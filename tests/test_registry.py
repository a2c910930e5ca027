"""The model surface and the registry: every registered model honours what it declares, and a
user's model from outside ``zoo/`` reaches every command with no other edit."""

import ast
import dataclasses
import json
import math
import sys
import typing
from pathlib import Path

import matplotlib.figure
import matplotlib.pyplot
import pyro
import pytest
import torch

from inference import reparam, svi
from zoo import cli, comparisons, fitting, registry, report, runs
from zoo import flags as zoo_flags

USER_FILE = "tests/user_models/ppca.py"


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_model_honours_its_declarations(name):
    """Its config survives a JSON round trip; each driver it declares takes a validated step
    with the declared options on data of the model's shape; its sample has the data's width."""
    spec = registry.get(name)
    assert spec.drivers and set(spec.drivers) <= set(registry.DRIVERS)
    binary = spec.default_binarize is not None
    x = (torch.rand(400, 16) < 0.3).float() if binary else torch.randn(400, 2)
    y = torch.arange(400) % 4
    info = registry.DataInfo.of(x, y, "synthetic", spec.default_binarize)
    options = spec.complete({}, info)
    model = spec.build(options)
    saved = json.loads(json.dumps(spec.saved_options(model)))
    again = spec.build({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    assert spec.saved_options(again) == spec.saved_options(model)
    args = registry.model_arguments(model, x, y, "train")
    for driver, declared in spec.drivers.items():
        if driver == "em":
            continue  # EM runs whole fits: tests/test_em.py and the mixtures' tests
        pyro.clear_param_store()
        fit = svi.fit if driver == "svi" else reparam.fit
        options = dict(declared)
        for hook, argument in (("driver_options", driver), ("fit_options", 1)):
            if callable(getattr(model, hook, None)):
                options.update(getattr(model, hook)(argument))
        value = args[0] if len(args) == 1 else args
        result = fit(model.model, model.guide, value, num_epochs=1, batch_size=100, **options)
        assert torch.isfinite(torch.tensor(result.objective)), (name, driver)
    drawn = model.sample(5)
    drawn = drawn[0] if isinstance(drawn, tuple) else drawn
    assert drawn.shape == (5, x.shape[1])
    splits = {"train": (x, y), "test": (x[:50], y[:50])}
    with torch.no_grad():
        figures = getattr(model, "figures", lambda *a: {})(splits, [], info)
        metrics = getattr(model, "metrics", lambda *a: {})(splits, 2, False)
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures.values()), name
    assert all(k.endswith(".png") for k in figures), name
    for figure in figures.values():  # pyplot keeps every figure until closed
        matplotlib.pyplot.close(figure)
    assert all(isinstance(v, (int, float, str, dict)) for v in metrics.values()), name


@pytest.mark.parametrize("name", registry.names())
def test_zoo_fit_evaluate_sample_every_registered_model(name, tmp_path):
    """`zoo fit NAME` with its default options (one epoch or a few EM iterations on 300 rows;
    image models on the 8x8 digits, to keep the held-out scoring quick), then `zoo evaluate`
    and `zoo sample`: the run directory holds what every command needs, for a model the test
    names only through the registry."""
    out = tmp_path / name
    spec = registry.get(name)
    driver = next(iter(spec.drivers))
    budget = ["--max-iter", "5"] if driver == "em" else ["--epochs", "1", "--eval-samples", "2"]
    where = ["--data", "digits"] if spec.default_binarize else []
    argv = ["fit", name, *where, "--max-data", "300", *budget, "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    scores = [k for k in metrics if k.endswith(("_log_likelihood", "_elbo"))]
    assert scores and all(math.isfinite(metrics[k]) for k in scores), metrics
    (out / "metrics.json").write_text("{}")  # evaluate computes them again from params.pt
    assert cli.main(["evaluate", str(out), "--num-samples", "2", "--quiet"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert set(again) >= set(scores)
    if driver == "em":  # exact scores: the same numbers from the saved parameters
        for key in (k for k in metrics if k.endswith("_log_likelihood")):
            assert again[key] == pytest.approx(metrics[key], rel=1e-6), key
    assert cli.main(["sample", str(out), "--num-samples", "4"]) == 0
    assert torch.load(out / "samples.pt", weights_only=True)["x"].shape[0] == 4


def test_a_users_model_file_through_every_command(tmp_path, capsys):
    """`zoo fit tests/user_models/ppca.py:PPCA`: flags from its __init__ (x_dim from the data),
    drivers from its class attribute; then evaluate and sample; a flag it does not have is an
    error naming it."""
    out = tmp_path / "ppca"
    argv = ["fit", f"{USER_FILE}:PPCA", "--z-dim", "1", "--epochs", "30", "--batch-size", "64"]
    assert cli.main([*argv, "--lr", "0.05", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == f"{USER_FILE}:PPCA" and config["model_config"]["x_dim"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    model, _ = runs.restore(out)
    x_test, _ = runs.split("faithful", "test", None)
    exact = model.exact_log_likelihood(x_test).mean().item()
    # the importance-sampled figure of the run, beside the closed form of the fitted model
    assert metrics["test_log_likelihood"] == pytest.approx(exact, abs=0.05)
    assert metrics["test_elbo"] < exact + 1e-3
    assert cli.main(["evaluate", str(out), "--num-samples", "200", "--quiet"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["log_likelihood_samples"] == 200 and again["objective"] == metrics["objective"]
    assert cli.main(["sample", str(out), "--num-samples", "7"]) == 0
    assert torch.load(out / "samples.pt", weights_only=True)["x"].shape == (7, 2)
    compare = ["compare", f"{USER_FILE}:PPCA", "--seeds", "2", "--epochs", "30", "--quiet"]
    assert (
        cli.main([*compare, "--lr", "0.05", "--batch-size", "64", "--out", str(tmp_path / "cmp")])
        == 0
    )
    rows = json.loads((tmp_path / "cmp" / "rows.json").read_text())
    assert sorted({r["method"] for r in rows}) == ["reparam", "svi"] and len(rows) == 4
    # the same objective by two drivers, seed by seed: within half a nat of each other, and
    # within 2 nats of the closed form of the model fitted above with the same number of steps
    # (a minibatch scaled wrongly, or not trained, lands tens of nats away)
    by = {(r["method"], r["seed"]): r["heldout_log_likelihood"] for r in rows}
    for seed in (0, 1):
        assert by["svi", seed] == pytest.approx(by["reparam", seed], abs=0.5)
    for row in rows:
        assert row["heldout_method"] == "importance sampling, K=100"
        assert row["heldout_log_likelihood"] == pytest.approx(exact, abs=2.0), row
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main([*argv, "--components", "3", "--out", str(tmp_path / "x")])
    assert "unrecognized arguments: --components 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["fit", f"{USER_FILE}:PPCA", "--inference", "em", "--out", str(tmp_path / "y")])
    assert "invalid choice: 'em'" in capsys.readouterr().err


def test_an_installed_package_adds_a_model_through_an_entry_point(tmp_path, monkeypatch, capsys):
    """A distribution on sys.path whose entry_points.txt names a class in the zoo.models group
    shows up in `zoo list` and fits by its name."""
    dist_info = tmp_path / "toy_zoo-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-zoo\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[zoo.models]\ntoyppca = toy_models:PPCA\n")
    (tmp_path / "toy_models.py").write_text(Path(USER_FILE).read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded_entry_points", [])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert cli.main(["list"]) == 0
    assert "toyppca" in capsys.readouterr().out
    out = tmp_path / "run"
    assert cli.main(["fit", "toyppca", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["model"] == "toyppca"
    sys.modules.pop("toy_models", None)


def _code_words(module) -> set:
    """The names, attributes and string constants of a module's code (docstrings left out)."""
    tree = ast.parse(Path(module.__file__).read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.update(node.name.split("."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                words.update(node.value.replace("-", " ").replace("_", " ").split())
    return words


@pytest.mark.parametrize(
    "module", [cli, zoo_flags, fitting, report, runs, comparisons, registry],
    ids=lambda m: m.__name__,
)  # fmt: skip
def test_the_cli_runs_comparisons_and_registry_name_no_model(module):
    """No registered model's name, class or module appears in the code of the modules above
    the models (their docstrings may show examples)."""
    words = {w.lower() for w in _code_words(module)}
    for name in registry.names():
        spec = registry.get(name)
        module_name = spec.cls.__module__.split(".")[-1]
        for word in {name, spec.cls.__name__, module_name}:
            assert word.lower() not in words, (module.__name__, word)
    assert dataclasses.is_dataclass(registry.Spec)


POSTPONED = """from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch


@dataclasses.dataclass
class Config:
    z_dim: int = 1
    scale: float = 0.5
    hidden: Tuple[int, ...] = (4,)
    label: Optional[str] = None


class WithConfig:
    Config = Config
    drivers = {"svi": {}}

    def __init__(self, config):
        self.config = config

    def model(self, x):
        with pyro.plate("data", len(x)):
            noise = dist.Normal(0.0, self.config.scale).expand([x.shape[1]]).to_event(1)
            pyro.sample("x", noise, obs=x)

    def guide(self, x):
        pass


class WithInit(WithConfig):
    Config = None

    def __init__(self, z_dim: int = 1, scale: float = 0.5):
        self.config = Config(z_dim=z_dim, scale=scale)
"""


def test_postponed_annotations_reach_the_model_as_their_types(tmp_path):
    """A user file that starts with ``from __future__ import annotations``: its config fields
    and its __init__'s parameters are strings until resolved; ``--z-dim 3`` arrived as '3'."""
    path = tmp_path / "postponed.py"
    path.write_text(POSTPONED)
    for name in ("WithConfig", "WithInit"):
        spec = registry.get(f"{path}:{name}")
        kinds = {o.name: o.type for o in spec.options()}
        assert kinds["z_dim"] is int and kinds["scale"] is float, kinds
        flags = zoo_flags.fit_parser(spec).parse_args(["--z-dim", "3", "--scale", "0.25"])
        assert flags.z_dim == 3 and flags.scale == 0.25
        if name == "WithConfig":
            assert kinds["hidden"] == typing.Tuple[int, ...]
            assert zoo_flags.fit_parser(spec).parse_args(["--hidden", "5", "6"]).hidden == [5, 6]


@pytest.mark.parametrize("name", registry.names())
def test_the_hooks_a_model_offers_have_the_declared_signatures(name):
    """Each ``ModelHooks`` method a registered model defines takes the declared parameters (in
    order; more only with defaults), so that the callers, which read hooks by those names and
    call them so, reach every model alike; an undeclared hook name is refused."""
    import inspect

    cls = registry.get(name).cls
    for hook in sorted(registry.HOOKS):
        declared = getattr(registry.ModelHooks, hook)
        own = getattr(cls, hook, None)
        if own is None or not callable(declared) or own is declared:
            continue
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        want = [
            p.name
            for p in inspect.signature(declared).parameters.values()
            if p.name != "self" and p.kind not in variadic
        ]
        have = [p for p in inspect.signature(own).parameters.values() if p.name != "self"]
        declared_params = inspect.signature(declared).parameters.values()
        if any(p.kind == p.VAR_POSITIONAL for p in declared_params):
            continue  # the model's own arguments (validation_score(*arguments))
        assert [p.name for p in have[: len(want)]] == want, (hook, have)
        extra = [p for p in have[len(want) :] if p.kind not in variadic]
        assert all(p.default is not p.empty for p in extra), (hook, extra)
    with pytest.raises(KeyError, match="not a hook ModelHooks declares"):
        registry.hook(cls, "sampel")
