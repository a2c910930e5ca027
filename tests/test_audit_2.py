"""The second reliability audit (``../shared/audits/reliability-2.md``), case by case: each bad
or edge input it found accepted silently, answered wrongly, answered with a raw traceback, or
losing a user's file is now refused with a message that names the problem and the fix, or
handled right. A table of cases through the command line, run in-process on small runs fitted
once per module; the case names are the audit's where one row covers one of its rows.
"""

import contextlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo import cli, runs
from zoo.models import _mixture

PPCA_FILE = Path(__file__).parent / "user_models" / "ppca.py"
PPCA_SOURCE = PPCA_FILE.read_text()


def zoo(*argv):
    """``zoo ARGV`` in this process: the exit code (argparse's and SystemExit's included)."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as stop:  # its message goes to stderr, as the interpreter would print it
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        return stop.code if isinstance(stop.code, int) else 1


def said(capsys) -> str:
    out = capsys.readouterr()
    return out.out + out.err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Fitted runs shared by the cases: a VAE on the digits, one on a data file, a PPCA of a
    user's file (copied, so that a case may change it), a diagonal GMM."""
    root = tmp_path_factory.mktemp("audit")
    fast = ["--epochs", "1", "--quiet", "--max-data", "200"]
    assert zoo("fit", "vae", "--data", "digits", *fast, "--out", root / "vae") == 0
    images = (np.random.default_rng(0).random((60, 64)) > 0.5).astype(np.float32)
    np.save(root / "images.npy", images)
    assert zoo("fit", "vae", "--data", root / "images.npy", "--epochs", "1", "--quiet",
               "--binarize", "none", "--out", root / "vaefile") == 0  # fmt: skip
    (root / "ppca.py").write_text(PPCA_SOURCE)
    assert zoo("fit", f"{root / 'ppca.py'}:PPCA", "--data", "faithful", "--epochs", "2",
               "--quiet", "--out", root / "ppca") == 0  # fmt: skip
    assert zoo("fit", "gmm", "--data", "faithful", "--covariance", "diag", "--quiet",
               "--out", root / "gmm") == 0  # fmt: skip
    return root


def files(folder):
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------- the model's code


def test_a_run_folder_imports_no_code_this_zoo_did_not_record(base, tmp_path, capsys):
    """rundirs/run-config-model-userfile-trojan and rundirs/run-config-model-module-this: a
    config.json edited to
    name a .py file or any module is refused before the file is imported."""
    run = tmp_path / "run"
    run.mkdir()
    for name in os.listdir(base / "ppca"):
        (run / name).write_bytes((base / "ppca" / name).read_bytes())
    marker = tmp_path / "ran"
    trojan = tmp_path / "trojan.py"
    trojan.write_text(f"open({str(marker)!r}, 'w').write('x')\nclass PPCA: pass\n")
    config = json.loads((run / "config.json").read_text())
    for name in (f"{trojan}:PPCA", "this:Zen"):
        (run / "config.json").write_text(json.dumps({**config, "model": name}))
        assert zoo("score", run, "--num-samples", "5") != 0
        message = said(capsys)
        assert "is not imported" in message and "--trust-model" in message, message
        assert not marker.exists()
    # a forged record (the right SHA-256 of the trojan, but no seal by this user's key)
    forged = dict(config["model_source"], path=str(trojan), name=f"{trojan}:PPCA")
    forged["sha256"] = __import__("hashlib").sha256(trojan.read_bytes()).hexdigest()
    (run / "config.json").write_text(
        json.dumps({**config, "model": f"{trojan}:PPCA", "model_source": forged})
    )
    assert zoo("evaluate", run, "--num-samples", "5") != 0
    assert not marker.exists()


def test_the_recorded_model_file_is_used_from_any_folder_and_refused_when_changed(
    base, tmp_path, capsys, monkeypatch
):
    """user/um-relative-swapped-file and user/um-relative-other-cwd: the run records its file
    by absolute path and SHA-256; from another folder holding another ppca.py the run's own
    file is used; a changed file is refused, naming both digests."""
    assert zoo("evaluate", base / "ppca", "--num-samples", "20", "--quiet") == 0
    expected = json.loads((base / "ppca" / "metrics.json").read_text())["test_log_likelihood"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "ppca.py").write_text("raise RuntimeError('not this file')\n")
    monkeypatch.chdir(other)
    assert zoo("evaluate", base / "ppca", "--num-samples", "20", "--quiet") == 0
    again = json.loads((base / "ppca" / "metrics.json").read_text())["test_log_likelihood"]
    assert again == pytest.approx(expected, rel=0.05)
    capsys.readouterr()
    source = base / "ppca.py"
    text = source.read_text()
    try:
        source.write_text(text + "\n# changed\n")
        assert zoo("score", base / "ppca", "--num-samples", "5") != 0
        message = said(capsys)
        assert "has changed since" in message and "SHA-256" in message
    finally:
        source.write_text(text)


USER_FILES = {
    "um-raises": ("raise RuntimeError('boom at import')\n", "raised RuntimeError.*line 1"),
    "um-syntax": ("class M(:\n    pass\n", "raised SyntaxError.*line 1"),
    "um-exit": ("import sys\nsys.exit(0)\n", "called sys.exit\\(0\\)"),
    "um-baddriver": (
        PPCA_SOURCE.replace('drivers = {"svi"', 'drivers = {"mcmc": {}, "svi"'),
        "declares drivers=\\{'mcmc'.*the drivers are em, svi, reparam",
    ),
}


@pytest.mark.parametrize("case", sorted(USER_FILES))
def test_a_users_model_file_that_fails_is_named(case, tmp_path, capsys):
    """user/um-raises, user/um-syntax, user/um-exit (exit 0, no run, no message), user/um-
    baddriver and user2/um-baddriver-noflags (a declared driver the zoo lacks blamed --epochs,
    or a KeyError with no flags): refused by name at import, before any folder is made."""
    source, message = USER_FILES[case]
    path = tmp_path / "model.py"
    path.write_text(source)
    code = zoo("fit", f"{path}:PPCA", "--data", "faithful", "--epochs", "1", "--quiet",
               "--out", tmp_path / "run")  # fmt: skip
    assert code != 0
    assert __import__("re").search(message, said(capsys)), said(capsys)
    assert not (tmp_path / "run").exists()


def test_untyped_options_read_numbers_and_a_size_of_zero_is_refused(tmp_path, capsys):
    """user/um-untyped-flag and user/um-zdim-0."""
    source = PPCA_SOURCE
    untyped = source.replace(
        "def __init__(self, x_dim: int = 2, z_dim: int = 1, init_scale: float = 0.1)",
        "def __init__(self, init_scale, x_dim: int = 2, z_dim: int = 1)",
    )
    assert untyped != source
    (tmp_path / "untyped.py").write_text(untyped)
    fit = ["--data", "faithful", "--epochs", "1", "--quiet"]
    assert zoo("fit", f"{tmp_path / 'untyped.py'}:PPCA", *fit, "--init-scale", "0.5",
               "--out", tmp_path / "a") == 0  # fmt: skip
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_config"]["init_scale"] == 0.5
    capsys.readouterr()
    assert zoo("fit", f"{PPCA_FILE}:PPCA", *fit, "--z-dim", "0", "--out", tmp_path / "b") == 2
    assert "latent site 'z' has no entries" in said(capsys)


# ------------------------------------------------------------------- users' files


def test_a_users_folder_is_not_touched_by_a_refused_fit(tmp_path, capsys):
    """rundirs/out-nonempty-user-folder, rundirs/out-user-folder-tmpfile,
    rundirs/out-overwrite-user-folder:
    refused, and neither a lock file added nor the user's temporary file removed."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / ".draft.tmp").write_text("mine too")
    for extra in ([], ["--overwrite"]):
        code = zoo("fit", "gmm", "--data", "faithful", "--quiet", "--out", folder, *extra)
        assert code != 0 and "holds no zoo run" in said(capsys)
        assert files(folder) == [".draft.tmp", "notes.txt"]


def test_overwrite_removes_every_file_the_old_run_wrote_and_no_other(base, tmp_path, capsys):
    """rundirs/out-overwrite-stale-files, rundirs/out-overwrite-vq-with-vae and extra/vq-
    overwrite-stale-prior-kill-resume (a stale checkpoint_prior.pt resumed into a new run):
    the run records what it and the commands after it wrote; --overwrite removes all of that
    and the stage checkpoints, and keeps a user's own file."""
    run = tmp_path / "run"
    fit = ["fit", "gmm", "--data", "faithful", "--quiet", "--out", run]
    assert zoo(*fit, "--covariance", "diag") == 0
    assert zoo("score", run, "--num-samples", "5") == 0
    assert zoo("denoise", run, "--noise-scale", "0.3", "--num-rows", "10") == 0
    (run / "checkpoint_prior.pt").write_bytes(b"left by an older run")  # not recorded
    (run / "notes.txt").write_text("the user's")
    written = set(files(run))
    assert {"scores_test.csv", "scores_test.json"} <= written
    assert zoo(*fit, "--overwrite") == 0
    now = set(files(run))
    assert "notes.txt" in now
    for name in written - {"notes.txt"}:
        if name.startswith(("scores_", "denoising_", "checkpoint_prior")):
            assert name not in now, name


def test_compare_follows_fits_rules_for_its_folder(base, tmp_path, capsys):
    """compare/cmp-out-is-run, compare/cmp-out-user-files, compare/cmp-out-user-files-no-
    overwrite, compare/cmp-out-is-file."""
    args = ["compare", "gmm", "--data", "faithful", "--seeds", "1", "--quiet", "--inference",
            "em", "--max-iter", "5"]  # fmt: skip
    assert zoo(*args, "--out", base / "gmm", "--overwrite") != 0
    assert "holds a zoo run" in said(capsys)
    user = tmp_path / "user"
    user.mkdir()
    (user / "table.csv").write_text("the user's table")
    for extra in ([], ["--overwrite"]):
        assert zoo(*args, "--out", user, *extra) != 0
        assert "holds no comparison" in said(capsys)
        assert (user / "table.csv").read_text() == "the user's table"
        assert files(user) == ["table.csv"]
    (tmp_path / "a_file").write_text("x")
    assert zoo(*args, "--out", tmp_path / "a_file") != 0
    assert "is a file, not a folder" in said(capsys)
    report = tmp_path / "report"
    assert zoo(*args, "--out", report) == 0
    assert zoo(*args, "--out", report) != 0 and "already holds a comparison" in said(capsys)
    assert zoo(*args, "--out", report, "--overwrite") == 0


@pytest.mark.parametrize("flag", ["--epochs", "--batch-size", "--heldout", "--max-data",
                                  "--num-samples", "--gradient-draws", "--chains"])  # fmt: skip
@pytest.mark.parametrize("value", ["0", "-5"])
def test_compare_refuses_zero_and_negative_counts(flag, value, tmp_path, capsys):
    """compare/cmp-epochs-0, compare/cmp-batch-0, compare/cmp-heldout-0, compare/cmp-maxdata-0,
    compare/cmp-numsamples-0, compare/cmp-gradient-draws-0, compare/cmp-gmm-nuts-chains-0 (0
    became the default while the Reproduce line said 0), compare/cmp-heldout-neg and
    compare/cmp-maxdata-neg (a negative count cut rows off the end)."""
    assert zoo("compare", "vae", "--data", "digits", flag, value, "--out", tmp_path / "c") == 2
    assert "must be a positive" in said(capsys)
    assert not (tmp_path / "c").exists()


def test_a_fit_in_progress_is_named_to_a_command_on_its_run(base, capsys):
    """rundirs2/score-during-overwrite: the writer holds the run; another command waits its
    turn instead of reading a half-written run."""
    with runs._lock(base / "gmm"):
        assert zoo("score", base / "gmm", "--num-samples", "5") != 0
    assert "another zoo process" in said(capsys)


def test_a_full_disk_is_said_and_leaves_no_truncated_file(base, tmp_path):
    """rundirs2/diskfull-score: the CSV is written whole or not at all, and the message says
    what happened instead of a traceback."""
    run = tmp_path / "gmm"
    run.mkdir()
    for name in os.listdir(base / "gmm"):
        if (base / "gmm" / name).is_file():
            (run / name).write_bytes((base / "gmm" / name).read_bytes())
    command = f"ulimit -f 1; {sys.executable} -m zoo.cli score {run} --num-samples 5"  # 512 bytes
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "the disk is full or a file-size limit was reached" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (run / "scores_test.csv").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------ data files


def write_data(path, array):
    np.save(path, array) if path.suffix == ".npy" else path.write_text(array)
    return path


DATA_CASES = {
    "d_complex.npy": (np.ones((20, 2), dtype=np.complex64), "holds complex numbers"),
    "d_1e39.csv": ("1,2\n3,1e39\n" * 5, "beyond float32's range"),
    "d_1e308.csv": ("1,2\n3,1e308\n" * 5, "beyond float32's range"),
    "d_zerocols.npy": (np.zeros((10, 0)), "the table is empty"),
    "d_f64_huge.npy": (np.array([[1.0, 2.0], [3.0, 1e300]] * 5), "beyond float32's range"),
    "d_text.npy": ("1,2\n3,4\n", "not a .npy array"),
    "d_objects.npy": (np.array([[{"a": 1}, 2]], dtype=object), "not a .npy array|objects"),
}


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_a_data_file_that_is_not_real_numbers_in_range_is_refused_by_what_is_wrong(
    name, tmp_path, capsys
):
    """user/data-d_complex-npy (imaginary parts dropped), user/data-d_1e39-csv, user/data-
    d_1e308-csv and user/data-d_f64_huge-npy (float32 overflow called NaN), user/data-d_zerocols-
    npy (a 0-feature model fitted); and user/data-1e39-value: load_file returned inf."""
    content, message = DATA_CASES[name]
    path = tmp_path / name
    if name == "d_objects.npy":
        np.save(path, content, allow_pickle=True)
    elif name == "d_text.npy":
        path.write_text(content)
    else:
        write_data(path, content)
    assert zoo("fit", f"{PPCA_FILE}:PPCA", "--data", path, "--epochs", "1", "--quiet",
               "--out", tmp_path / "run") == 2  # fmt: skip
    assert __import__("re").search(message, said(capsys))
    assert not (tmp_path / "run").exists()
    if name.endswith(".csv"):
        from zoo import data

        with pytest.raises(data.DataError, match="beyond float32's range"):
            data.load_file(path)


def test_a_byte_order_mark_and_booleans_are_read_as_data(tmp_path):
    """user/data-d_bom-csv (the first row was taken for a header) and user/data-d_bool-npy."""
    from zoo import data

    rows = np.random.default_rng(0).normal(size=(30, 2))
    text = "\n".join(f"{a},{b}" for a, b in rows) + "\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    loaded = data.load_file(tmp_path / "bom.csv")
    assert loaded.shape == (30, 2)
    np.testing.assert_allclose(loaded.numpy(), rows, rtol=1e-6)
    flags = np.random.default_rng(1).random((25, 3)) > 0.5
    np.save(tmp_path / "flags.npy", flags)
    assert torch.equal(data.load_file(tmp_path / "flags.npy"), torch.from_numpy(flags).float())


# --------------------------------------------------------------------------- uses


def test_a_run_fitted_on_a_data_file_is_scored_on_its_training_rows_called_so(base, capsys):
    """uses/score-vaefile, uses/complete-vaefile-split-test, interp/interp-on-vaefile: a data
    file has no test split; its rows are used as what they are, the training rows."""
    assert zoo("score", base / "vaefile", "--num-samples", "5") == 0
    summary = json.loads((base / "vaefile" / "scores_train.json").read_text())
    assert summary["split"] == "train" and summary["num_rows"] == 60
    assert not (base / "vaefile" / "scores_test.json").exists()
    assert zoo("score", base / "vaefile", "--num-samples", "5", "--split", "test") != 0
    assert "is a data file" in said(capsys)
    complete = ["complete", base / "vaefile", "--num-rows", "5", "--num-samples", "5"]
    assert zoo(*complete, "--mask", "bottom-half") == 0
    written = base / "vaefile" / "completion_bottom-half_train.json"
    assert json.loads(written.read_text())["split"] == "train"
    assert not (base / "vaefile" / "completion_bottom-half_test.json").exists()


def test_max_data_cuts_the_training_rows_only(base):
    """extra/score-maxdata-run: the fit scored all 360 test rows; so does zoo score."""
    fitted = json.loads((base / "vae" / "metrics.json").read_text())
    assert zoo("score", base / "vae", "--num-samples", "5") == 0
    summary = json.loads((base / "vae" / "scores_test.json").read_text())
    assert summary["num_rows"] == fitted["num_test"] == 360


def save_pt(path, value):
    torch.save(value, path)


def truncated(path):
    save_pt(path, torch.ones(64, dtype=torch.bool))
    path.write_bytes(path.read_bytes()[:40])


class Evil:
    """Runs code when unpickled: a mask file must never be."""

    def __reduce__(self):
        return (print, ("this ran",))


def npz(path):
    with open(path, "wb") as handle:
        np.savez(handle, m=np.ones(3))


MASKS = {
    "mask_alltrue.pt": (lambda p: save_pt(p, torch.ones(64, dtype=torch.bool)), "nothing to fill"),
    "mask_full.npy": (lambda p: np.save(p, np.ones((20, 64), bool)), "nothing to fill"),
    "mask_dict.pt": (lambda p: save_pt(p, {"m": torch.ones(3)}), "holds a dict"),
    "mask_empty.pt": (lambda p: p.write_bytes(b""), "cannot be read"),
    "mask_trunc.pt": (truncated, "cannot be read"),
    "mask_rawpickle.pt": (
        lambda p: p.write_bytes(__import__("pickle").dumps([1, 2])),
        "pickle of Python objects",
    ),
    "mask_text.npy": (lambda p: p.write_text("1,0,1"), "not a .npy array"),
    "mask_npz.npy": (npz, "holds a NpzFile"),
    "mask_evil.pt": (lambda p: save_pt(p, {"m": Evil()}), "not unpickled"),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_a_mask_file_that_is_not_a_mask_is_refused_by_what_it_is(name, base, tmp_path, capsys):
    """uses/maskfile-alltrue.pt and uses/maskfile-full.npy (nothing hidden, accuracy 0
    reported), uses/maskfile-dict.pt, uses/maskfile-empty.pt, uses/maskfile-trunc.pt,
    uses/maskfile-rawpickle.pt, uses/maskfile-evil.pt-torchzip (raw tracebacks),
    uses/maskfile-text.npy (allow_pickle advised), uses/maskfile-npz.npy."""
    make, message = MASKS[name]
    path = tmp_path / name
    make(path)
    code = zoo("complete", base / "vae", "--num-rows", "20", "--num-samples", "20", "--mask", path)
    assert code != 0
    text = said(capsys)
    assert message in text and "Traceback" not in text, text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["denoise", "gmm", "--num-rows", "20", "--noise-scale", "1e30"], "not finite under"),
        (["denoise", "gmm", "--num-rows", "20", "--noise-scale", "inf"], "positive finite"),
        (["complete", "vae", "--num-rows", "20", "--mask", "bottom-half", "--hide-labels"],
         "takes no labels"),
        (["sample", "vae", "--interpolate", "0,1", "--steps", "20000"], "from 2 to 200"),
        (["sample", "vae", "--interpolate", "-1,2"], "pairs of row numbers"),
        (["sample", "vae", "--interpolate", "²,1"], "pairs of row numbers"),
    ],
)  # fmt: skip
def test_uses_refuse_what_they_cannot_do(argv, message, base, capsys):
    """uses/noise-scale-1e30 (a NaN written, exit 0), uses/noise-scale-inf (the data blamed),
    uses/complete-hide-labels-vae, rundirs2/interp-steps-20000 (the hang), interp/interp-neg
    and interp/interp-superscript."""
    command, run, *rest = argv
    assert zoo(command, base / run, *rest) != 0
    assert message in said(capsys)


def test_outlier_rows_are_binarized_as_the_runs_rows(base, tmp_path, capsys):
    """uses/score-outliers-grey.npy and uses/score-outliers-neg.npy: a raw support error."""
    grey = np.random.default_rng(0).random((10, 64)).astype(np.float32)
    np.save(tmp_path / "grey.npy", grey)
    score = ["score", base / "vae", "--num-samples", "5", "--outliers"]
    assert zoo(*score, tmp_path / "grey.npy") == 0
    np.save(tmp_path / "neg.npy", grey - 1)
    assert zoo(*score, tmp_path / "neg.npy") != 0
    assert "the run's rows are binarized" in said(capsys)


# ------------------------------------------------------------------- fits and resumes


def test_fit_refusals_name_the_flag(base, tmp_path, capsys):
    """models/ssvae-stack-on-itself, models/ssvae-stack-static-binarized, models/diff-levels-
    without-grey, models/vq-codebook-loss-decay, models/vq-iwae-5; rundirs/resume-ckpt-from-
    other-model, rundirs/resume-no-flags, rundirs/run-config-maxdata-true."""
    quick = ["--data", "digits", "--epochs", "1", "--quiet", "--max-data", "100"]
    own = tmp_path / "ss"
    assert zoo("fit", "ssvae", *quick, "--labels", "50", "--out", own) == 0
    assert zoo("fit", "ssvae", *quick, "--labels", "50", "--stack-on", own, "--out", own,
               "--overwrite") != 0  # fmt: skip
    assert "this fit's own --out" in said(capsys)
    assert zoo("fit", "ssvae", *quick, "--labels", "50", "--binarize", "static",
               "--stack-on", base / "vae", "--out", tmp_path / "ss2") != 0  # fmt: skip
    assert "binarized" in said(capsys)
    assert zoo("fit", "diffusion", *quick, "--steps", "10", "--levels", "5",
               "--out", tmp_path / "d") != 0  # fmt: skip
    assert "--levels applies with --likelihood grey only" in said(capsys)
    small_vq = ["--channels", "8", "--num-codes", "8", "--code-dim", "4", "--prior-channels", "8",
                "--prior-layers", "1"]  # fmt: skip
    assert zoo("fit", "vqvae", *quick, *small_vq, "--codebook", "loss", "--decay", "0.9",
               "--out", tmp_path / "q") != 0  # fmt: skip
    assert "--decay applies with --codebook ema only" in said(capsys)
    assert zoo("fit", "vqvae", *quick, *small_vq, "--iwae", "5", "--out", tmp_path / "q2") != 0
    assert "point mass" in said(capsys)
    # resume with the run's own settings (no flags), and a checkpoint of another model refused
    run = tmp_path / "r"
    assert zoo("fit", "vae", *quick, "--out", run) == 0
    assert zoo("fit", "vae", "--resume", run, "--epochs", "2", "--quiet") == 0
    assert json.loads((run / "config.json").read_text())["max_data"] == 100
    other = tmp_path / "other"
    assert zoo("fit", "vae", *quick, "--z-dim", "3", "--out", other) == 0
    (run / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    capsys.readouterr()
    assert zoo("fit", "vae", "--resume", run, "--epochs", "3", "--quiet") != 0
    assert "written by another model" in said(capsys)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "max_data": True}))
    assert zoo("score", run, "--num-samples", "5") != 0
    assert "max_data must be a positive integer" in said(capsys)


# ------------------------------------------------------------- stages and exact resume

VQ = ["vqvae", "--data", "digits", "--quiet", "--max-data", "120", "--batch-size", "40",
      "--channels", "8", "--num-codes", "8", "--code-dim", "4", "--prior-channels", "8",
      "--prior-layers", "1"]  # fmt: skip


def state(run):
    return torch.load(run / "params.pt", weights_only=True)


def assert_same_state(a, b):
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_vqvae_resumed_with_more_epochs_is_the_straight_run(tmp_path, pinned_threads):
    """extra/vq-resume-more-epochs and extra/vq-resume-finished-run: a stage's checkpoint holds its
    own parameters and its modules' buffers (the prior's step count) only; a first stage that
    moves on makes the second start over. A 2-epoch run resumed to 3 epochs ends, tensor by
    tensor, where a straight 3-epoch run ends; a finished run resumed as it is keeps its
    learned prior and its scores."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert zoo("fit", *VQ, "--epochs", "3", "--out", straight) == 0
    assert zoo("fit", *VQ, "--epochs", "2", "--out", resumed) == 0
    before = json.loads((resumed / "metrics.json").read_text())
    assert zoo("fit", "vqvae", "--resume", resumed, "--quiet") == 0  # finished: nothing to do
    after = json.loads((resumed / "metrics.json").read_text())
    assert after["test_bound_learned_prior"] == before["test_bound_learned_prior"]
    assert zoo("fit", "vqvae", "--resume", resumed, "--epochs", "3", "--quiet") == 0
    assert_same_state(state(resumed), state(straight))
    prior = torch.load(resumed / "checkpoint_prior.pt", weights_only=True)
    assert not any("encoder" in name for name in prior["pyro_params"])


# flags that make each model small on the digits; a model not named here runs on its defaults
SMALL = {
    "bmm": ["--data", "digits", "-k", "3"],
    "gmm": ["--data", "faithful"],
    "diffusion": ["--data", "digits", "--steps", "10"],
    "ssvae": ["--data", "digits", "--labels", "50"],
    "vqvae": VQ[1:],
}


@pytest.mark.parametrize("name", __import__("zoo.registry", fromlist=["names"]).names())
def test_every_model_resumes_from_a_checkpoint_as_the_straight_run(
    name, tmp_path, pinned_threads, monkeypatch
):
    """The registry's every model (so a new one is covered), with its first driver that runs
    the training loop: a fit of 2 epochs, and one stopped after its first epoch's checkpoint
    (as a kill -9 leaves it: the run's files of a finished epoch 1) and resumed to 2, end on
    the same parameters, every stage included, tensor by tensor."""
    from zoo import registry

    spec = registry.get(name)
    driver = next((d for d in spec.drivers if d in ("svi", "reparam")), None)
    if driver is None:
        pytest.skip(f"{name}: EM keeps no checkpoint to resume")
    flags = SMALL.get(name, ["--data", "digits"])
    flags = [*flags, "--inference", driver, "--quiet", "--eval-samples", "2"]
    if "--max-data" not in flags:
        flags += ["--max-data", "96", "--batch-size", "32"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    commands = [
        [*flags, "--epochs", "2", "--out", straight],
        [*flags, "--epochs", "1", "--out", resumed],
        ["--resume", resumed, "--epochs", "2", "--quiet"],
    ]
    for command in commands:
        # each as in a fresh process: the mixtures number their Pyro names per process
        monkeypatch.setattr(_mixture, "_instances", itertools.count())
        assert zoo("fit", name, *command) == 0
    assert_same_state(state(resumed), state(straight))


def test_scores_and_denoising_refuse_data_outside_what_the_model_takes(base, capsys):
    """misc/api-denoise-nonbinary-flip (grey data cleaned as flipped bits),
    misc/api-scores-x-out-of-support (Pyro's support error with a tensor dump),
    uses/score-data-faithful and uses/score-data-file-wrongwidth (said to have no test
    split)."""
    from inference import uses

    model, _ = runs.restore(base / "vae")
    grey = torch.rand(5, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="flip= is a noise model of binary data"):
        uses.denoise(model.model, model.guide, grey, flip=0.1)
    with pytest.raises(ValueError, match="observed site 'x': .* outside the support"):
        uses.scores(model.model, model.guide, grey, num_samples=5)
    assert zoo("score", base / "vae", "--num-samples", "5", "--data", "faithful") != 0
    message = said(capsys)
    assert "--data faithful" in message and "no 'test' split" not in message, message
    np.save(base / "wide.npy", np.ones((10, 5), np.float32))
    assert zoo("score", base / "vae", "--num-samples", "5", "--data", base / "wide.npy") != 0
    assert "rows of 5 features; the run's model was fitted on 64" in said(capsys)


# ------------------------------------------------------------ the rest of the audit's rows


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"held_out_binarize": "bogus"}, "unknown binarization 'bogus'"),
        ({"held_out_binarize": None, "binarize": None}, "outside the support of Bernoulli"),
        ({"data": "faithful"}, "'faithful' is continuous and cannot be binarized"),
        ({"data": "mnist"}, "config.json's data was changed since the fit"),
    ],
    ids=["binarize-bogus", "binarize-none", "data-faithful", "data-mnist"],
)
def test_a_config_json_edited_after_the_fit_is_named(edit, message, base, tmp_path, capsys):
    """rundirs/run-config-binarize-bogus, rundirs/run-config-binarize-none,
    rundirs/run-config-data-faithful, rundirs/run-config-data-mnist: each was "has no test
    split" or a shape error from inside the model; the run records the shape of a row."""
    if edit.get("data") == "mnist":
        pytest.importorskip("tests.conftest").mnist_available() or pytest.skip("no MNIST")
    run = tmp_path / "run"
    run.mkdir()
    for name in os.listdir(base / "vae"):
        if (base / "vae" / name).is_file():
            (run / name).write_bytes((base / "vae" / name).read_bytes())
    config = json.loads((run / "config.json").read_text())
    assert config["row_shape"] == [64]
    (run / "config.json").write_text(json.dumps({**config, **edit}))
    assert zoo("score", run, "--num-samples", "5") != 0
    text = said(capsys)
    assert message in text and "no 'test' split" not in text and "Trace Shapes" not in text, text


def test_one_row_without_its_row_axis_is_told_how_to_pass_it(base):
    """misc/api-ll-1d and misc/api-scores-1d: a (64,) row was "got (4,)" before; now the
    message shows the shape given and the fix."""
    from inference import evaluate, uses

    model, _ = runs.restore(base / "vae")
    row = torch.ones(64)
    for call in (evaluate.log_likelihood, uses.scores):
        with pytest.raises(ValueError, match=r"got \(64,\): one row is x\[None\], of shape"):
            call(model.model, model.guide, row, num_samples=5)


def test_a_fit_that_ends_diverged_says_so(tmp_path, capsys):
    """models/diff-lr-huge: at --lr 1e6 the diffusion model's one step ran its parameters away
    after the last recorded epoch (test ELBO -1.8e7 nats per image), with no warning; the
    held-out score is now set against the first step's, and the run says it diverged. At the
    default rate nothing is said."""
    fit = ["fit", "diffusion", "--data", "digits", "--epochs", "1", "--quiet", "--max-data",
           "200", "--steps", "20"]  # fmt: skip
    assert zoo(*fit, "--lr", "1e6", "--out", tmp_path / "huge") == 0
    assert "the fit diverged: test_elbo is" in said(capsys)
    assert json.loads((tmp_path / "huge" / "metrics.json").read_text())["diverged"] is True
    assert zoo(*fit, "--out", tmp_path / "default") == 0
    assert "the fit diverged" not in said(capsys)
    assert "diverged" not in json.loads((tmp_path / "default" / "metrics.json").read_text())


def test_a_prior_checkpoint_of_another_vqvae_is_named(tmp_path, capsys):
    """models/vq-resume-prior-from-other: a torch message naming no file before."""
    for run, channels in (("a", "8"), ("b", "16")):  # the last --prior-channels counts
        assert zoo("fit", *VQ, "--epochs", "1", "--prior-channels", channels,
                   "--out", tmp_path / run) == 0  # fmt: skip
    prior = (tmp_path / "a" / "checkpoint_prior.pt").read_bytes()
    (tmp_path / "b" / "checkpoint_prior.pt").write_bytes(prior)
    capsys.readouterr()
    assert zoo("fit", "vqvae", "--resume", tmp_path / "b", "--quiet") != 0
    assert "checkpoint_prior.pt was written by another model" in said(capsys)


@pytest.mark.parametrize(
    "source, message",
    [
        ("raise RuntimeError('boom at import')\n", "raised RuntimeError.*line 1"),
        (PPCA_SOURCE.replace('drivers = {"svi"', 'drivers = {"mcmc": {}, "svi"'),
         "declares drivers=\\{'mcmc'.*the drivers are em, svi, reparam"),
    ],
    ids=["raises", "baddriver"],
)  # fmt: skip
def test_compare_names_a_users_file_that_fails(source, message, tmp_path, capsys):
    """compare/cmp-user-raises (a raw traceback) and compare/cmp-user-baddriver (a row
    labelled 'mcmc' fitted by the reparameterized driver); no report folder is left."""
    path = tmp_path / "model.py"
    path.write_text(source)
    code = zoo("compare", f"{path}:PPCA", "--data", "faithful", "--seeds", "1", "--quiet",
               "--out", tmp_path / "cmp")  # fmt: skip
    assert code != 0
    assert __import__("re").search(message, said(capsys))
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
    "source, message",
    [
        ("raise ValueError('bad value at import')\n", "model.py raised ValueError.*line 1"),
        (PPCA_SOURCE, "RuntimeError in .*model.py, line \\d+: .*non-negative"),
    ],
    ids=["valueerror", "zdim-neg"],
)  # fmt: skip
def test_a_users_error_names_its_file_and_line(source, message, tmp_path, capsys):
    """user/um-raises-valueerror (the user's ValueError shown with no file) and
    user/um-zdim-neg (a raw RuntimeError traceback from the user's guide)."""
    path = tmp_path / "model.py"
    path.write_text(source)
    zoo("fit", f"{path}:PPCA", "--data", "faithful", "--epochs", "1", "--quiet", "--z-dim", "-1",
        "--out", tmp_path / "run")  # fmt: skip
    text = said(capsys)
    assert __import__("re").search(message, text) and "Traceback" not in text, text


@contextlib.contextmanager
def read_only(folder):
    """``folder`` made unwritable for the block: chmod for a user, ``chattr +i`` for root
    (whom chmod does not stop); skipped where neither holds."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", folder]
    elif subprocess.run(["chattr", "+i", folder], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", folder]
    else:
        pytest.skip("running as root without chattr: no folder can be made read-only")
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_a_read_only_folder_is_said_and_nothing_is_lost(base, tmp_path, capsys):
    """rundirs2/ro-run-score, rundirs2/ro-run-resume, rundirs2/ro-run-overwrite,
    rundirs2/ro-parent-out, rundirs2/ro-compare-out: a raw PermissionError traceback each;
    now a sentence naming the folder, and the run's files as they were."""
    run = tmp_path / "run"
    assert zoo("fit", "vae", "--data", "digits", "--epochs", "1", "--quiet", "--max-data",
               "100", "--out", run) == 0  # fmt: skip
    before = {name: (run / name).read_bytes() for name in files(run)}
    parent = tmp_path / "parent"
    parent.mkdir()
    commands = [
        (run, ["score", run, "--num-samples", "5"]),
        (run, ["fit", "vae", "--resume", run, "--epochs", "2", "--quiet"]),
        (run, ["fit", "vae", "--data", "digits", "--epochs", "1", "--quiet", "--max-data", "50",
               "--out", run, "--overwrite"]),
        (parent, ["fit", "gmm", "--data", "faithful", "--quiet", "--out", parent / "new"]),
        (parent, ["compare", "gmm", "--data", "faithful", "--seeds", "1", "--quiet",
                  "--inference", "em", "--out", parent / "cmp"]),
    ]  # fmt: skip
    for folder, argv in commands:
        capsys.readouterr()
        with read_only(folder):
            assert zoo(*argv) != 0, argv
        text = said(capsys)
        assert "not permitted" in text or "denied" in text, (argv, text)
        assert str(folder) in text and "Traceback" not in text, (argv, text)
    assert {name: (run / name).read_bytes() for name in files(run)} == before
    assert files(parent) == []


def test_a_fit_stopped_by_a_full_disk_resumes_where_it_stopped(tmp_path, pinned_threads):
    """rundirs2/diskfull-fresh-fit (a raw OSError traceback) and rundirs2/diskfull-resume-
    then-free: under a file-size limit the fit stops with a sentence, leaving no partial file;
    with the space back, --resume ends where a fit never stopped ends."""
    flags = ["fit", "vae", "--data", "digits", "--quiet", "--max-data", "96", "--batch-size", "32"]
    run, straight = tmp_path / "run", tmp_path / "straight"
    command = " ".join(
        [sys.executable, "-m", "zoo.cli", *flags, "--epochs", "2", "--out", str(run)]
    )
    done = subprocess.run(
        ["bash", "-c", f"ulimit -f 64; {command}"], capture_output=True, text=True, timeout=300
    )  # fmt: skip; 32 KiB: the checkpoint is larger
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "the disk is full or a file-size limit was reached" in done.stderr
    assert "--resume" in done.stderr
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert zoo("fit", "vae", "--resume", run, "--epochs", "2", "--quiet") == 0
    assert zoo(*flags, "--epochs", "2", "--out", straight) == 0
    assert_same_state(state(run), state(straight))


def test_torchrun_refuses_what_it_cannot_do_and_resumes_exactly(tmp_path):
    """misc/tr-batch-1 (a ZeroDivisionError traceback on rank 1), misc/tr-nonrun-out (refused,
    but a lock left in the user's folder) and extra/torchrun-resume-more-epochs (a 2-rank run
    resumed from 2 to 4 epochs was not the straight 4-epoch run): two ranks through the
    command line; the same, for one epoch to two on the driver itself, is
    tests/test_loop_and_drivers.py::test_a_distributed_fit_resumes_exactly."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "zoo.cli"]  # fmt: skip
    fit = ["fit", "vae", "--data", "digits", "--quiet", "--max-data", "64", "--batch-size", "16",
           "--eval-samples", "2"]  # fmt: skip
    env = {**os.environ, "ZOO_THREADS": "torch", "OMP_NUM_THREADS": "1"}

    def launch(*argv):
        return subprocess.run([*torchrun, *map(str, argv)], capture_output=True, text=True,
                              timeout=300, env=env)  # fmt: skip

    one = launch(*fit, "--batch-size", "1", "--epochs", "1", "--out", tmp_path / "b1")
    assert one.returncode != 0 and "needs at least 2 rows" in one.stderr
    assert "ZeroDivisionError" not in one.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused = launch(*fit, "--epochs", "1", "--out", mine)
    assert refused.returncode != 0 and "holds no zoo run" in refused.stderr
    assert files(mine) == ["notes.txt"]
    for argv in (
        [*fit, "--epochs", "4", "--out", tmp_path / "straight"],
        [*fit, "--epochs", "2", "--out", tmp_path / "resumed"],
        ["fit", "vae", "--resume", tmp_path / "resumed", "--epochs", "4", "--quiet"],
    ):
        done = launch(*argv)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    assert_same_state(state(tmp_path / "resumed"), state(tmp_path / "straight"))


AUDIT = Path(__file__).resolve().parents[2] / "shared" / "audits" / "reliability-2.md"


def test_every_case_of_the_audit_has_its_test_here():
    """Each row of the audit's table (``group/case``) is named in a test of this file, so that
    a reader finds the check for every case (a name broken over a docstring's lines at a
    hyphen counts)."""
    if not AUDIT.exists():
        pytest.skip(f"{AUDIT} is not beside this checkout")
    cases = __import__("re").findall(r"^\| [A-Z-]+ \| (\S+/\S+) \|", AUDIT.read_text(), flags=8)
    assert len(cases) == 97  # the table's rows: every case not refused clearly by 078dff9
    source = __import__("re").sub(r"-\n\s*", "-", Path(__file__).read_text())
    missing = [case for case in cases if case not in source]
    assert not missing, f"audit cases without a test here: {missing}"
