"""A run written before the redesign (tests/run/data/run_v0: a tiny GLA trained 4 steps on MQAR by
the code of 2026-11-29) still loads: `lcsm eval` reproduces its eval.json, and the trainer resumes
from its checkpoint."""

import json
import shutil
from pathlib import Path

import torch
import yaml

from lcsm.cli.main import main
from lcsm.config.recipe import load_recipe
from lcsm.nn.model import Model
from lcsm.run.trainer import Trainer, train

OLD = Path(__file__).parent / "data" / "run_v0"


def copy_run(tmp_path) -> Path:
    run = tmp_path / "run_v0"
    shutil.copytree(OLD, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["out_dir"] = str(run)  # out_dir may change on resume
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run


def test_lcsm_eval_of_an_old_run_reproduces_its_eval_json(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))
    run = copy_run(tmp_path)
    before = json.loads((run / "eval.json").read_text())
    assert main(["eval", str(run), "--device", "cpu", "-o", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    metrics = again.get("metrics", again)
    assert abs(metrics["loss"] - before["loss"]) < 1e-5 and metrics["accuracy"] == before["accuracy"]


def test_an_old_checkpoint_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))
    run = copy_run(tmp_path)
    recipe = load_recipe(run / "config.yaml")
    model = Model(recipe.model)
    trainer = Trainer(model, recipe.optimizer, recipe.schedule, 4, device=torch.device("cpu"))
    state = trainer.load(run)
    assert state["step"] == 4 and trainer.steps_done == 4
    assert trainer.optimizer.state  # AdamW's moments came back with it
    # and `lcsm train --resume auto` takes the finished run as it is
    result = train(recipe, resume=True, quiet=True)
    assert result.status == "done" and result.step == 4 and result.resumed_from == 4
