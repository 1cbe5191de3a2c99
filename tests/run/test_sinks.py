"""Metric sinks: `log: [jsonl, tensorboard, wandb]` gives every sink the scalars of metrics.jsonl,
a resumed run drops the events after its checkpoint, and lcsm plot still reads metrics.jsonl."""

import json
import os
import signal
import sys
import types

import pytest

from lcsm.cli.main import main
from lcsm.config.recipe import load_recipe
from lcsm.run.sinks import scalars
from lcsm.run.trainer import train

from helpers import cli_error, tiny


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))


def jsonl_scalars(run_dir) -> dict[tuple[str, int], float]:
    out = {}
    for line in open(run_dir / "metrics.jsonl"):
        record = json.loads(line)
        out.update({(tag, record["step"]): v for tag, v in scalars(record).items()})
    return out


def tensorboard_scalars(run_dir) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_scalars_flatten_a_record():
    record = {"split": "eval", "step": 4, "loss": 1.5, "accuracy": 0.5, "early": True,
              "slices": {"a": {"loss": 1.0, "seq_len": 16}, "b": {"loss": 2.0, "seq_len": 32}}}
    assert scalars(record) == {"eval/loss": 1.5, "eval/accuracy": 0.5, "eval/a/loss": 1.0, "eval/a/seq_len": 16.0,
                               "eval/b/loss": 2.0, "eval/b/seq_len": 32.0}


def test_tensorboard_gets_the_scalars_of_metrics_jsonl_and_a_resume_purges_the_replayed_steps(tmp_path):
    pytest.importorskip("tensorboard")  # the test extra installs it
    recipe = load_recipe(tiny(tmp_path, log=["jsonl", "tensorboard"]))
    train(recipe, quiet=True, on_step=lambda r: r["step"] == 5 and os.kill(os.getpid(), signal.SIGINT))
    train(recipe, quiet=True, resume=True)
    run = recipe.run_dir
    tb = tensorboard_scalars(run)
    expected = jsonl_scalars(run)
    assert set(tb) == set(expected) and ("train/loss", 12) in tb and ("eval/seq_len=32 num_kv_pairs=4/accuracy", 12) in tb
    for key, value in expected.items():
        assert tb[key] == pytest.approx(value, rel=1e-6), key  # tensorboard stores float32


def fake_wandb(monkeypatch, logged: list, inits: list):
    """A stand-in for the wandb package with its init/log/finish API (the real one below when installed)."""

    class Run:
        def log(self, values, step):
            logged.append((step, dict(values)))

        def finish(self):
            logged.append("finished")

    module = types.ModuleType("wandb")
    module.init = lambda **kw: inits.append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", module)


def test_wandb_is_offline_unless_configured_and_gets_the_same_scalars(tmp_path, monkeypatch):
    logged, inits = [], []
    fake_wandb(monkeypatch, logged, inits)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    recipe = load_recipe(tiny(tmp_path, log=["wandb"], steps=4))
    train(recipe, quiet=True)
    assert inits[0]["mode"] == "offline" and inits[0]["dir"] == str(recipe.run_dir) and inits[0]["resume"] == "allow"
    assert inits[0]["config"]["steps"] == 4 and inits[0]["id"].startswith("lcsm-")
    got = {(tag, step): v for item in logged if item != "finished" for step, values in [item] for tag, v in values.items()}
    assert got == jsonl_scalars(recipe.run_dir) and logged[-1] == "finished"
    monkeypatch.setenv("WANDB_MODE", "online")
    train(recipe, quiet=True, overwrite=True)
    assert inits[-1]["mode"] == "online"


def test_real_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # optional (lcsm[wandb]); the code path is covered by the test above without it
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = load_recipe(tiny(tmp_path, log=["jsonl", "wandb"], steps=2, eval_every=2))
    train(recipe, quiet=True)
    assert list((recipe.run_dir / "wandb").glob("offline-run-*"))


def test_a_sink_not_installed_is_a_note_and_plot_still_reads_metrics_jsonl(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    recipe = load_recipe(tiny(tmp_path, log=["wandb"], steps=4))
    from rich.console import Console

    train(recipe, console=Console(file=sys.stdout, width=200), quiet=False)
    assert "wandb is not installed" in capsys.readouterr().out
    assert (recipe.run_dir / "metrics.jsonl").exists()
    pytest.importorskip("matplotlib")
    assert main(["plot", str(recipe.run_dir)]) == 0
    assert "log.0: 'csv' is not allowed" in cli_error(["train", "quickstart", "--set", "log=[csv]"], capsys)
