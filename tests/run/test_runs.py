"""Runs are never lost: verified checkpoints and the fall back to an earlier one, nothing deleted that
lcsm did not write, locks between real processes, hostile names, the one eval schema, a NaN's
checkpoint resumed by the command its message prints, sizes refused before they are allocated."""

import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import cli_error, tiny, train_losses  # tests/helpers.py (tests/ is on sys.path)
from lcsm.cli.main import main
from lcsm.config.recipe import RecipeError, load_recipe
from lcsm.nn.model import Model
from lcsm.run import files, lock
from lcsm.run.evaluate import parse_eval, read_eval
from lcsm.run.trainer import train

ROOT = Path(__file__).resolve().parents[2]
OLD = Path(__file__).parent / "data" / "run_v0"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))


def write_recipe(tmp_path, **fields) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path, **fields)))
    return str(path)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stop_at(step):
    def on_step(record):  # a real SIGINT, as Ctrl-C sends it
        if record["step"] == step:
            os.kill(os.getpid(), __import__("signal").SIGINT)

    return on_step


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_verified_step_folders_and_the_newest_k_are_kept(tmp_path):
    recipe = load_recipe(tiny(tmp_path, checkpoint_every=2, keep_checkpoints=3))
    train(recipe, quiet=True)
    folder = recipe.run_dir / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000008", "step-000010", "step-000012"]
    for step in folder.iterdir():
        manifest = json.loads((step / "manifest.json").read_text())
        assert set(manifest["files"]) == {"model.safetensors", "trainer.pt"}
        for name, entry in manifest["files"].items():
            data = (step / name).read_bytes()
            assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert {"config.yaml", "metrics.jsonl", "eval.json", "checkpoint/step-000012"} <= files.owned(recipe.run_dir)

    # every checkpoint damaged: resuming stops with an error naming the files, and touches nothing
    for step in folder.iterdir():
        weights = step / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    before = snapshot(recipe.run_dir)
    with pytest.raises(RecipeError) as info:
        train(recipe, quiet=True, resume=True)
    msg = str(info.value)
    assert all(f"step-0000{n}/model.safetensors" in msg for n in ("08", "10", "12")) and "Nothing was changed or deleted" in msg
    assert snapshot(recipe.run_dir) == before


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    whole = load_recipe(tiny(tmp_path / "a", checkpoint_every=2))
    train(whole, quiet=True)
    reference = train_losses(whole.run_dir)

    part = load_recipe(tiny(tmp_path / "b", checkpoint_every=2))
    assert train(part, quiet=True, on_step=stop_at(6)).step == 6
    folder = part.run_dir / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000004", "step-000006"]
    trainer = folder / "step-000006" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[: trainer.stat().st_size // 2])  # a full disk cut it short
    with open(part.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 7, "lo')  # and the last line, when the process was killed

    result = train(part, quiet=True, resume=True)
    assert result.status == "done" and result.resumed_from == 4
    said = "\n".join(result.notes)
    assert "checkpoint/step-000006 cannot be read" in said and "trainer.pt" in said and "step 4" in said
    assert "dropped its last line" in said
    assert (folder / "step-000006.unreadable" / "trainer.pt").exists()  # kept for inspection, never deleted
    assert train_losses(part.run_dir) == reference  # step for step, as if nothing had happened


def test_a_checkpoint_that_cannot_be_written_leaves_the_earlier_ones(tmp_path, monkeypatch):
    import errno

    import torch

    recipe = load_recipe(tiny(tmp_path, checkpoint_every=2))
    real = torch.save
    saves = []

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("trainer.pt"):
            saves.append(f)
            if len(saves) == 3:  # the third checkpoint: the disk fills up half way through its file
                Path(f).write_bytes(b"\x00" * 10)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RecipeError, match=r"step-000006: cannot write the checkpoint \(No space left on device\); the earlier"):
        train(recipe, quiet=True)
    folder = recipe.run_dir / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002", "step-000004"]  # no half-written folder
    monkeypatch.setattr(torch, "save", real)
    (folder / "step-000008.partial").mkdir()  # and what a kill during a save leaves: ignored, then replaced
    (folder / "step-000008.partial" / "trainer.pt").write_bytes(b"cut")
    result = train(recipe, quiet=True, resume=True)
    assert result.resumed_from == 4 and result.status == "done"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000010", "step-000012"]


def copy_old_run(tmp_path) -> Path:
    run = tmp_path / "run_v0"
    shutil.copytree(OLD, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["out_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run


def test_resume_auto_never_deletes_a_run_whose_checkpoint_cannot_be_read(tmp_path, capsys):
    run = copy_old_run(tmp_path)  # the flat layout of the code before: checkpoint/model.safetensors + trainer.pt
    (run / "checkpoint" / "trainer.pt").write_bytes(b"\x00" * 64)  # refused by the safe loader
    before = snapshot(run)
    config = str(run / "config.yaml")
    msg = cli_error(["train", config, "--resume", "auto"], capsys)
    assert f"{run / 'checkpoint' / 'trainer.pt'}: cannot be read" in msg and "Nothing was changed or deleted" in msg
    msg = cli_error(["train", config], capsys)
    assert "already holds a run (at step 4)" in msg and "without a checkpoint" not in msg
    after = snapshot(run)
    assert {k: after[k] for k in before} == before and set(after) - set(before) <= {Path(files.MANIFEST)}


def test_overwrite_removes_only_what_lcsm_wrote(tmp_path):
    recipe = load_recipe(tiny(tmp_path, steps=4, checkpoint_every=2))
    train(recipe, quiet=True)
    run = recipe.run_dir
    (run / "notes.txt").write_text("mine")
    (run / "checkpoint" / "best.pt").write_bytes(b"the user's own copy")
    train(recipe, quiet=True, overwrite=True, on_step=stop_at(2))
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoint" / "best.pt").read_bytes() == b"the user's own copy"
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["best.pt", "step-000002"]
    assert not (run / "eval.json").exists() and max(train_losses(run)) == 2


def test_a_directory_holding_files_lcsm_did_not_write_is_refused(tmp_path, capsys):
    path = write_recipe(tmp_path, steps=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("my own config\n")
    (run / "eval.json").write_text('{"mine": 1}\n')
    before = snapshot(run)
    for extra in ([], ["--overwrite"], ["--resume", "auto"]):
        msg = cli_error(["train", path, *extra], capsys)
        assert "config.yaml, eval.json were not written by lcsm" in msg and "move them away" in msg
    assert snapshot(run) == before  # (the code before deleted both, as "leftovers of a failed start")

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2\n")
    msg = cli_error(["train", path, "--set", f"out_dir={other}"], capsys)
    assert "holds files lcsm did not write (data.csv)" in msg and "--overwrite" in msg
    assert main(["train", path, "--set", f"out_dir={other}", "--overwrite"]) == 0  # beside them, as asked
    assert (other / "data.csv").read_text() == "1,2\n" and (other / "eval.json").exists()


def test_hostile_names_cannot_leave_runs_or_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    data = tiny(tmp_path, name="../escaped")
    del data["out_dir"]
    path = tmp_path / "work" / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    assert "name: '../escaped' holds a path separator" in cli_error(["train", str(path)], capsys)
    grid = {"name": "../../outside", "base": data | {"name": "x"}, "grid": {"optimizer.lr": [1e-2]}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    assert "name: '../../outside' holds a path separator" in cli_error(["ablate", "g.yaml", "--out", "out"], capsys)
    grid = {"name": "g", "base": data | {"name": "x"}, "grid": {"v": [{"label": "..", "set": {"steps": 2}}]}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    assert "grid.v.0: label: '..' is not a folder name" in cli_error(["ablate", "g.yaml", "--out", "out"], capsys)
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "outside").exists()


# --------------------------------------------------------------------------- a NaN, and the way on


def test_the_checkpoint_kept_after_a_nan_resumes_with_the_command_the_message_prints(tmp_path, capsys, monkeypatch):
    path = write_recipe(tmp_path, checkpoint_every=2)
    real = Model.forward
    calls = {"n": 0}

    def poisoned(model, tokens, labels=None, *args, **kwargs):
        loss = real(model, tokens, labels, *args, **kwargs)
        if labels is None or kwargs.get("return_logits"):
            return loss  # evaluation
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(Model, "forward", poisoned)
    assert main(["train", path]) == 1
    err = capsys.readouterr().err
    assert "step 7: the loss is nan" in err and "step-000006" in err
    command = err.split("Continue with a lower learning rate: ", 1)[1].strip()
    monkeypatch.setattr(Model, "forward", real)
    argv = shlex.split(command)
    assert argv[:2] == ["lcsm", "train"] and "--resume" in argv
    assert main(argv[1:]) == 0  # exactly what the message printed
    printed = " ".join(capsys.readouterr().out.split())  # (rich wraps long lines)
    assert "at step 6" in printed and "resuming with optimizer.lr = 0.0033 (was 0.01)" in printed
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["optimizer"]["lr"] == 0.0033
    lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r["step"] for r in lines if r["split"] == "train"]
    assert steps == list(range(1, 13))  # no step twice
    lr7 = next(r["lr"] for r in lines if r["split"] == "train" and r["step"] == 7)
    assert lr7 < 0.0034  # the lower rate from the checkpoint's step on


# --------------------------------------------------------------------------- locks


def _env(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "LCSM_CACHE": str(tmp_path / "cache")}


def _wait_for(predicate, timeout, what, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


def test_a_run_in_use_is_refused_to_a_second_process_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    path = write_recipe(tmp_path, steps=10**6, eval_every=10**6, log_every=10**5, threads=1)
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "lcsm.cli", "train", path], env=_env(tmp_path),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run / "config.yaml").exists(), 180, "the first training", first)
        # a second process (the code before trained into the same directory: a timeout here)
        second = subprocess.run([sys.executable, "-m", "lcsm.cli", "train", path, "--resume", "auto"], env=_env(tmp_path),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert f"this run directory is in use by process {first.pid} on {socket.gethostname()}" in second.stderr
        assert f"(lcsm train {path})" in second.stderr
        msg = cli_error(["train", path, "--overwrite"], capsys)  # and this test's process, a third
        assert f"in use by process {first.pid}" in msg
    finally:
        first.kill()
        first.wait()
    assert (run / files.LOCK).exists()  # SIGKILL left it: stale now
    said = []
    with lock.acquire(run, log=said.append):
        (line,) = said
        assert line.startswith(f"{run}: took over a stale lock (process {first.pid} on {socket.gethostname()} (lcsm train {path})")
        assert line.endswith("is no longer running)")
        assert json.loads((run / files.LOCK).read_text())["pid"] == os.getpid()
    assert not (run / files.LOCK).exists()


# --------------------------------------------------------------------------- the eval schema


def test_every_eval_layout_lcsm_wrote_reads_through_one_function(tmp_path):
    metrics = {"loss": 1.5, "accuracy": 0.25, "slices": {"all": {"loss": 1.5, "accuracy": 0.25}}}
    flat = {"step": 4, **metrics}  # lcsm train before
    old_eval = {"run": "runs/x", "step": 4, "task": {"kind": "mqar"}, "metrics": metrics}  # lcsm eval before
    for data in (flat, old_eval):
        (tmp_path / "e.json").write_text(json.dumps(data))
        record = read_eval(tmp_path / "e.json")
        assert record.step == 4 and record.metrics == metrics
    assert read_eval(OLD / "eval.json").metrics["accuracy"] == 0.0
    assert parse_eval({}) is None and read_eval(tmp_path / "missing.json") is None


# --------------------------------------------------------------------------- bad input, and what is printed


def test_sizes_beyond_the_machine_are_refused_before_anything_is_allocated(tmp_path, capsys, monkeypatch):
    from lcsm.run import size

    path = write_recipe(tmp_path)
    monkeypatch.setattr(size, "ram", lambda: 2**30)  # a machine with 1 GiB
    msg = cli_error(["train", path, "--set", "model.d_model=4096", "--set", "device=cpu"], capsys)
    assert "model: 135M parameters need 2 GiB to train" in msg and "more than the 1 GiB of this machine's memory" in msg
    msg = cli_error(["train", path, "--set", "task.train.0.num_examples=100000000"], capsys)
    assert "task: 1.6G tokens of examples" in msg and "more than the 1 GiB" in msg
    assert not (tmp_path / "run").exists()


def test_file_output_options_check_the_folder_and_the_extension(tmp_path, capsys):
    missing = tmp_path / "missing" / "dir" / "x.json"
    assert f"the folder {missing.parent} does not exist" in cli_error(["schema", "-o", str(missing)], capsys)
    assert "must end in .json" in cli_error(["schema", "-o", str(tmp_path / "x.txt")], capsys)
    assert "must end in .png or .pdf or .svg" in cli_error(["plot", str(tmp_path), "-o", str(tmp_path / "x.txt")], capsys)
    assert "must end in .json" in cli_error(["eval", str(tmp_path), "-o", str(tmp_path / "x.csv")], capsys)


def test_metrics_a_plot_reads_while_a_line_is_being_written(tmp_path):
    from lcsm.run.plot import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 2.0}\n{"split": "eval", "st')
    train_, evals = read_metrics(tmp_path)
    assert [r["step"] for r in train_] == [1] and evals == []


def test_brackets_in_paths_and_in_the_install_hint_are_printed_as_written(tmp_path, capsys, monkeypatch):
    path = write_recipe(tmp_path, steps=2, out_dir=str(tmp_path / "runs[v1]"))
    assert main(["train", path]) == 0
    assert "runs[v1]" in capsys.readouterr().out
    from lcsm.run import report

    monkeypatch.setattr(report, "plot", lambda *a: None)  # as without matplotlib
    grid = {"name": "g", "base": tiny(tmp_path, steps=2, eval_every=2) | {"name": "x"}, "grid": {"optimizer.lr": [1e-2]}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    assert main(["ablate", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "out[2]")]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert "'lcsm[plots]'" in out and "out[2]" in out
    assert "± 0.0000" not in out  # one seed: the value alone


def test_the_readme_states_the_run_guarantees_and_the_cpu_torch_advice_in_the_quick_start():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "download.pytorch.org/whl/cpu" in quick
    runs = readme.split("## Runs", 1)[1].split("\n## ", 1)[0]
    assert all(word in runs for word in ("atomic", "verified", "locked", "never deletes"))
