"""Training runs: resume equivalence, Ctrl-C, non-finite losses, run directories, eval, plot and the CLI's errors."""

import json
import os
import signal

import pytest
import torch
import yaml

from lcsm.cli.main import main
from lcsm.run.evaluate import load_run
from lcsm.nn.model import Model
from lcsm.config.recipe import RecipeError, load_recipe
from lcsm.run.trainer import TrainingError, train

from helpers import cli_error, tiny, train_losses  # tests/helpers.py (tests/ is on sys.path)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))


def test_the_loss_of_forward_with_labels_is_the_cross_entropy_of_its_logits():
    model = Model.from_spec({"vocab_size": 50, "d_model": 16, "n_layers": 2, "mixer": {"kind": "eos", "oscillation": {"kind": "outer"}}}).double()
    tokens = torch.randint(50, (2, 9))
    labels = torch.randint(50, (2, 9))
    labels[0, :4] = -100
    logits = model(tokens)
    mask = labels != -100
    ref = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    torch.testing.assert_close(model(tokens, labels), ref)
    torch.testing.assert_close(model(tokens, labels, reduction="sum"), ref * mask.sum())
    loss, at_labels = model(tokens, labels, return_logits=True)
    torch.testing.assert_close(at_labels, logits[mask])
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(model(tokens, logits_to_keep=1), logits[:, -1:])
    # the gradients of the chunked head equal those through the full logits
    g = torch.autograd.grad(model(tokens, labels), list(model.parameters()))
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_interrupted_and_resumed_run_gives_the_same_losses(tmp_path):
    whole = load_recipe(tiny(tmp_path / "a"))
    train(whole, quiet=True)
    reference = train_losses(whole.run_dir)
    assert sorted(reference) == list(range(1, 13))

    part = load_recipe(tiny(tmp_path / "b"))

    def ctrl_c(record):  # a real SIGINT, as Ctrl-C sends it, in the middle of the run
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    result = train(part, quiet=True, on_step=ctrl_c)
    assert result.status == "interrupted" and result.step == 5
    assert torch.load(part.run_dir / "checkpoint" / "step-000005" / "trainer.pt", weights_only=True)["step"] == 5
    with pytest.raises(RecipeError, match="already holds a run"):
        train(part, quiet=True)
    resumed = train(part, quiet=True, resume=True)
    assert resumed.status == "done" and resumed.resumed_from == 5
    assert train_losses(part.run_dir) == reference  # bit for bit, every step
    ma, mb = load_run(whole.run_dir)[1], load_run(part.run_dir)[1]
    for (name, p), q in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(p, q), name


def test_resume_refuses_a_changed_recipe(tmp_path):
    recipe = load_recipe(tiny(tmp_path))
    train(recipe, quiet=True, on_step=lambda r: r["step"] == 3 and os.kill(os.getpid(), signal.SIGINT))
    changed = load_recipe(tiny(tmp_path, optimizer={"lr": 1e-3}))
    with pytest.raises(RecipeError, match="differs from the run's config.yaml \\(optimizer.lr\\)"):
        train(changed, quiet=True, resume=True)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    recipe = load_recipe(tiny(tmp_path, checkpoint_every=2))
    real = Model.forward
    calls = {"n": 0}

    def poisoned(model, tokens, labels=None, *args, **kwargs):
        loss = real(model, tokens, labels, *args, **kwargs)
        if labels is None or kwargs.get("return_logits"):
            return loss  # evaluation
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(Model, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"step 7: the loss is nan; training stopped and the last good checkpoint \(step 6\)"):
        train(recipe, quiet=True)
    state = torch.load(recipe.run_dir / "checkpoint" / "step-000006" / "trainer.pt", weights_only=True)
    assert state["step"] == 6 and not (recipe.run_dir / "checkpoint" / "step-000007").exists()
    model = load_run(recipe.run_dir)[1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_overwrite_starts_over_and_keeps_other_files(tmp_path):
    recipe = load_recipe(tiny(tmp_path, steps=2))
    train(recipe, quiet=True)
    (recipe.run_dir / "notes.txt").write_text("mine")
    train(recipe, quiet=True, overwrite=True)
    assert (recipe.run_dir / "notes.txt").read_text() == "mine"
    assert max(train_losses(recipe.run_dir)) == 2


def test_text_run_reports_bits_per_byte(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    recipe = load_recipe(tiny(tmp_path, task={"kind": "text", "corpus": str(corpus), "seq_len": 32, "val_fraction": 0.1}, steps=6, eval_every=6))
    result = train(recipe, quiet=True)
    assert result.eval["bits_per_byte"] == pytest.approx(result.eval["loss"] / 0.6931471805599453)
    assert result.eval["perplexity"] > 1


# --------------------------------------------------------------------------- the command line


def write_recipe(tmp_path, **fields):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path, **fields)))
    return str(path)


def test_cli_train_eval_plot(tmp_path, capsys):
    path = write_recipe(tmp_path)
    assert main(["train", path, "--set", "steps=8"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "seq_len=32 num_kv_pairs=4" in printed
    run = tmp_path / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["steps"] == 8 and config["model"]["d_model"] == 16 and config["model"]["vocab_size"] == 64
    trained = (run / "eval.json").read_text()
    assert main(["eval", str(run)]) == 0
    report = json.loads((run / "eval" / "test.json").read_text())  # beside the training's eval.json, which stays
    assert report["step"] == 8 and set(report["metrics"]["slices"]) == {"seq_len=16 num_kv_pairs=2", "seq_len=32 num_kv_pairs=4"}
    assert (run / "eval.json").read_text() == trained
    other = tmp_path / "task.yaml"
    test = [{"seq_len": 48, "num_kv_pairs": 8, "num_examples": 16}]
    other.write_text(yaml.safe_dump({"kind": "mqar", "vocab_size": 64, "train": test, "test": test}))
    assert main(["eval", str(run / "checkpoint" / "step-000008" / "model.safetensors"), "--task", str(other)]) == 0
    assert "seq_len=48 num_kv_pairs=8" in json.loads((run / "eval" / "task.json").read_text())["metrics"]["slices"]
    pytest.importorskip("matplotlib")
    assert main(["train", path, "--set", f"out_dir={tmp_path / 'run2'}", "--set", "steps=4"]) == 0
    assert main(["plot", str(run), str(tmp_path / "run2"), "-o", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_exit_2_with_one_clear_line(tmp_path, capsys):
    path = write_recipe(tmp_path)
    assert "no such file" in cli_error(["train", str(tmp_path / "missing.yaml")], capsys)
    assert "model.mixer.oscillation: unknown kind 'wave'" in cli_error(["train", path, "--set", "model.mixer.oscillation.kind=wave"], capsys)
    assert "unknown device 'gpu7'" in cli_error(["train", path, "--set", "device=gpu7"], capsys)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in cli_error(["train", path, "--set", "device=cuda"], capsys)
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus")
    assert "less than one context" in cli_error(["train", path, "--set", f"task={{kind: text, corpus: {small}}}"], capsys)
    assert "no such file or folder" in cli_error(["train", path, "--set", f"task={{kind: text, corpus: {tmp_path / 'nope'}}}"], capsys)
    unreadable = tmp_path / "locked.yaml"
    unreadable.write_text("steps: 1")
    unreadable.chmod(0)
    if not os.access(unreadable, os.R_OK):  # root reads anything
        assert "cannot read" in cli_error(["train", str(unreadable)], capsys)
    assert main(["train", path, "--set", "steps=2"]) == 0
    capsys.readouterr()
    assert "already holds a run" in cli_error(["train", path, "--set", "steps=2"], capsys)
    assert "no such run directory" in cli_error(["eval", str(tmp_path / "nope")], capsys)
    assert "vocabulary" in cli_error(["eval", str(tmp_path / "run"), "--task", "selective_copying"], capsys)
    assert "no metrics.jsonl" in cli_error(["plot", str(tmp_path)], capsys)


@pytest.mark.parametrize("setting, options", [(True, {}), ({"mode": "reduce-overhead"}, {"mode": "reduce-overhead"}),
                                              (False, None)])
def test_the_compile_setting_reaches_the_blocks(tmp_path, monkeypatch, setting, options):
    # torch.compile itself is tests/nn/test_compile.py's; here: what `compile:` asks of the model
    seen = []
    monkeypatch.setattr(Model, "compile_blocks", lambda self, **o: seen.append(o) or self)
    result = train(load_recipe(tiny(tmp_path, steps=2, eval_every=2, compile=setting)), quiet=True)
    assert result.status == "done" and seen == ([] if options is None else [options])
    graphs_note = [n for n in result.notes if "CUDA graphs need a CUDA device" in n]
    assert len(graphs_note) == (setting == {"mode": "reduce-overhead"})


def test_cuda_graphs_are_refused_on_several_ranks(tmp_path, capsys):
    # --nproc: before torchrun is launched (a torchrun start of its own meets the same check in train())
    out = f"out_dir={tmp_path}/x"
    assert "--nproc 2: compile: mode 'reduce-overhead' captures CUDA graphs" in cli_error(
        ["train", "--nproc", "2", "--set", "compile.mode=reduce-overhead", "--set", out], capsys)
    with pytest.raises(RecipeError, match=r"compile: mode 'reduce-overhead' captures CUDA graphs, which lcsm runs in "
                                          r"one process only \(this run has 2\); with several ranks use compile: true"):
        load_recipe(tiny(tmp_path, compile={"mode": "reduce-overhead"}, parallel={"data": 2}))
    with pytest.raises(RecipeError, match=r"compile.mode: 'fast' is not allowed; allowed: default, reduce-overhead"):
        load_recipe(tiny(tmp_path, compile={"mode": "fast"}))
    with pytest.raises(RecipeError, match=r"compile: true, false or \{mode: \.\.\.\} \(got 'often'\)"):
        load_recipe(tiny(tmp_path, compile="often"))
