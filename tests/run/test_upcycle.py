"""lcsm upcycle: a dense run split into experts (and head groups) is the dense model exactly with
every expert on, by every split; the partitions recover planted structure; top-k < E converts,
trains from the init checkpoint (--init-from, --resume auto) and resumes; bad arguments are exit 2
naming the flag; lcsm show lists the experts and the active parameters."""

import importlib.util
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import (  # tests/helpers.py (tests/ is on sys.path)
    cli_error,
    tiny,
    train_losses,
)

from lcsm.cli.main import main
from lcsm.config.base import RecipeError
from lcsm.config.recipe import load_recipe
from lcsm.config.spec import SpecError, load_model_spec
from lcsm.nn.model import Model
from lcsm.run.evaluate import load_run
from lcsm.run.trainer import train
from lcsm.run.upcycle import balanced_assign, balanced_kmeans, split_importance, upcycle
from lcsm.tasks import build_task, epoch_batches

HIDDEN = 32  # the dense GLU: d_model 16 × hidden_ratio 2


def dense_recipe(tmp_path, **fields):
    """The helpers' tiny MQAR run with a GLU channel mixer and a hybrid pattern (an EOS and an
    attention layer), so that attention experts cover both mixer kinds."""
    r = tiny(tmp_path, **fields)
    r["model"] |= {"channel_mixer": {"kind": "glu", "hidden_ratio": 2}, "mixers": {"attn": {"kind": "attention"}},
                   "pattern": "mixer attn"}
    return r


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A trained dense run (12 steps), shared by the tests of this file; they never write into it."""
    tmp = tmp_path_factory.mktemp("dense")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCSM_CACHE", str(tmp / "cache"))
        recipe = load_recipe(dense_recipe(tmp))
        train(recipe, quiet=True)
        yield recipe.run_dir


@pytest.fixture(autouse=True)
def _cache(dense, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE", str(dense.parent / "cache"))  # the dense run's MQAR data, generated once


def logits(run, tokens) -> torch.Tensor:
    return load_run(run)[1].double()(tokens)


TOKENS = torch.randint(64, (3, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("split", ["random", "clustering", "importance"])
@pytest.mark.parametrize("shared, experts, attention", [(0, 4, None), (8, 3, 2), (0, 8, 2)])
def test_every_expert_on_is_the_dense_model(dense, tmp_path, split, shared, experts, attention):
    """top-k = E, a uniform (zero) router and scale E, the shared expert unscaled; head groups top-k = G."""
    res = upcycle(dense, tmp_path / "moe", experts=experts, top_k=experts, split=split, shared=shared, router="zero",
                  attention_experts=attention, attention_top_k=attention, batches=2)
    spec = res.recipe.model
    assert spec.channel_mixer.hidden_size == (HIDDEN - shared) // experts and spec.channel_mixer.output_scale == experts
    assert (spec.mixers["attn"].head_routing is not None) == (attention is not None)
    torch.testing.assert_close(logits(res.run_dir, TOKENS), logits(dense, TOKENS), rtol=1e-12, atol=1e-12)
    # every neuron in exactly one expert (or the shared one), every expert the same size
    for layer in res.record["layers"]:
        ids = sorted(layer["shared"] + [j for e in layer["experts"] for j in e])
        assert ids == list(range(HIDDEN)) and len(layer["shared"]) == shared
        assert {len(e) for e in layer["experts"]} == {(HIDDEN - shared) // experts}
    assert load_run(res.run_dir)[3] == 0  # an init checkpoint: step 0


def test_a_partial_router_is_close_to_dense_and_a_centroid_router_routes(dense, tmp_path):
    """top-k < E changes the function (that is the point); a centroid router does not send every token
    to the same experts."""
    res = upcycle(dense, tmp_path / "moe", experts=4, top_k=2, split="importance", batches=2)
    _, model, _, _ = load_run(res.run_dir)
    model(TOKENS)
    for block in model.blocks:
        stats = block.channel_mixer.routing_stats
        assert (stats.f > 0).sum() >= 3  # at least three of the four experts receive tokens
    assert not torch.allclose(logits(res.run_dir, TOKENS), logits(dense, TOKENS))


def test_balanced_assignment_and_kmeans():
    score = torch.tensor([[5.0, 1.0], [4.0, 0.0], [3.0, 2.0], [0.0, 1.0]])
    assert balanced_assign(score, [2, 2]).tolist() == [0, 0, 1, 1]  # row 2 prefers 0, which is full
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:4] * 5
    points = torch.cat([centres[c] + 0.3 * torch.randn(6, 8, generator=g) for c in range(4)])
    labels, _ = balanced_kmeans(points, 4, seed=1)
    groups = {tuple(sorted((labels == c).nonzero().flatten().tolist())) for c in range(4)}
    assert groups == {tuple(range(6 * c, 6 * c + 6)) for c in range(4)}  # the planted clusters
    assert torch.bincount(balanced_kmeans(torch.randn(10, 3, generator=g), 3)[0]).tolist() == [4, 3, 3]


def test_importance_split_gives_each_cluster_its_neurons():
    """Tokens in 4 directions; neurons 4c..4c+3 matter only to cluster c, neurons 16, 17 to every
    cluster: the shared expert takes 16 and 17, expert e the block of the cluster whose centroid
    is its router row."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.eye(6)[:4]
    cluster = torch.arange(40) % 4
    x = dirs[cluster] * 3 + 0.2 * torch.randn(40, 6, generator=g)
    score = 0.01 * torch.rand(40, 18, generator=g)
    for n, c in enumerate(cluster.tolist()):
        score[n, 4 * c : 4 * c + 4] += 1.0
    score[:, 16:] += 0.8
    shared, experts, router = split_importance(x, score, 4, 2, seed=0)
    assert shared.tolist() == [16, 17]
    for e in range(4):
        c = int(router[e].argmax())  # the cluster of the expert's router row
        assert experts[e].tolist() == list(range(4 * c, 4 * c + 4))


def test_top_k_below_experts_trains_from_the_init_checkpoint_and_resumes(dense, tmp_path, capsys):
    new = tmp_path / "moe"
    assert main(["upcycle", str(dense), "--experts", "4", "--top-k", "2", "--split", "importance", "--batches", "2",
                 "--shared", "8", "--attention-experts", "2", "--attention-top-k", "1", "--out", str(new)]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps long lines at its width
    assert "4 experts of 6 neurons, top-2, a shared expert of 8" in printed and "--init-from" in printed
    # a plain start would replace the upcycled weights by a random init: refused
    assert "--init-from" in cli_error(["train", str(new / "config.yaml")], capsys)

    # the first training step's loss is the upcycled model's loss on the first batch: the weights were used
    recipe = load_recipe(new / "config.yaml", ["steps=6", "eval_every=3", "checkpoint_every=3"])
    _, model, _, _ = load_run(new)
    data = build_task(recipe.task, recipe.seed, run_dir=new)
    seg_index, rows = epoch_batches(data.train, recipe.batch_size, recipe.seed, 0)[0]
    with torch.no_grad():
        first = float(model(data.train[seg_index].inputs[rows], data.train[seg_index].labels[rows]))

    def stop(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    result = train(recipe, quiet=True, init_from=new, on_step=stop)
    assert result.status == "interrupted" and result.step == 3
    assert train_losses(new)[1] == pytest.approx(first, rel=1e-5)
    resumed = train(recipe, quiet=True, resume=True)
    assert resumed.status == "done" and resumed.resumed_from == 3

    # the same schedule uninterrupted, started with --resume auto from a fresh upcycle: the same losses
    again = tmp_path / "again"
    upcycle(dense, again, experts=4, top_k=2, split="importance", batches=2, shared=8, attention_experts=2, attention_top_k=1)
    whole = load_recipe(again / "config.yaml", ["steps=6", "eval_every=3", "checkpoint_every=3"])
    train(whole, quiet=True, resume=True)
    assert train_losses(again) == train_losses(new)
    metrics = [json.loads(line) for line in (new / "metrics.jsonl").read_text().splitlines()]
    assert any("blocks.0.channel_mixer.max_load" in m and "blocks.1.mixer.head_routing.max_load" in m for m in metrics)


def test_init_from_a_dense_run_into_a_new_directory(dense, tmp_path, capsys):
    """The dense baseline of the demonstration: the dense run continued in a new directory with a fresh
    optimizer (its tokenizer.json comes along)."""
    (dense / "tokenizer.json").write_text("{}")  # (MQAR reads none; the copy is what is tested)
    try:
        out = tmp_path / "cont"
        assert main(["train", str(dense / "config.yaml"), "--init-from", str(dense), "--set", f"out_dir={out}",
                     "--set", "steps=2"]) == 0
        assert f"starting from the weights of {dense}" in capsys.readouterr().out.replace("\n", "")
        assert (out / "tokenizer.json").read_text() == "{}"
    finally:
        (dense / "tokenizer.json").unlink()
    mismatch = cli_error(["train", str(dense / "config.yaml"), "--init-from", str(dense), "--set", f"out_dir={tmp_path / 'x'}",
                          "--set", "model.d_model=32"], capsys)
    assert "--init-from" in mismatch and "do not fit" in mismatch
    assert "no such run directory" in cli_error(["train", str(dense / "config.yaml"), "--init-from", str(tmp_path / "nope")], capsys)


def test_bad_arguments_are_clear_errors(dense, tmp_path, capsys):
    base = ["upcycle", str(dense), "--out", str(tmp_path / "moe")]
    cases = [
        (["--experts", "3", "--top-k", "1"], "--experts: 3 experts must divide the routed neurons: the dense GLU has 32; experts that fit: 2, 4, 8, 16, 32"),
        (["--experts", "4", "--top-k", "1", "--shared", "6"], "--experts: 4 experts must divide the routed neurons: the dense GLU has 32, less --shared 6: 26"),
        (["--experts", "4", "--top-k", "5"], "--top-k: top-k = 5 must be in 1..--experts = 4"),
        (["--experts", "1", "--top-k", "1"], "--experts: at least 2 experts"),
        (["--experts", "4", "--top-k", "2", "--split", "kmeans"], "--split: unknown split 'kmeans'; allowed: random, clustering, importance"),
        (["--experts", "4", "--top-k", "2", "--router", "learned"], "--router: unknown router init 'learned'"),
        (["--experts", "4", "--top-k", "2", "--shared", "32"], "--shared: 32 shared neurons leave none"),
        (["--experts", "4", "--top-k", "2", "--attention-experts", "4", "--attention-top-k", "1"],
         "--attention-experts: 4 head groups must divide the heads of mixer (2)"),
        (["--experts", "4", "--top-k", "2", "--attention-experts", "2"], "--attention-top-k: give the head groups"),
        (["--experts", "4", "--top-k", "2", "--attention-top-k", "1"], "--attention-top-k: needs --attention-experts"),
        (["--experts", "4", "--top-k", "2", "--device", "gpu"], "--device: unknown device 'gpu'"),
    ]
    for extra, message in cases:
        assert message in cli_error(base + extra, capsys), extra
    assert "--out: the new run directory must not be the dense run" in cli_error(
        ["upcycle", str(dense), "--out", str(dense), "--experts", "4", "--top-k", "2"], capsys)
    assert "no such run directory" in cli_error(["upcycle", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--experts", "4", "--top-k", "2"], capsys)

    # a run without a dense GLU: none, and an MoE run
    plain = load_recipe(tiny(tmp_path / "plain", steps=1))
    train(plain, quiet=True)
    assert "RUN: " in (e := cli_error(["upcycle", str(plain.run_dir), "--out", str(tmp_path / "y"), "--experts", "2", "--top-k", "1"], capsys))
    assert "channel_mixer is 'none'" in e
    moe = tmp_path / "moe"
    assert main(base + ["--experts", "4", "--top-k", "2", "--split", "random"]) == 0
    capsys.readouterr()
    assert "already holds config.yaml, checkpoint, upcycle.json; pass --overwrite" in cli_error(base + ["--experts", "4", "--top-k", "2"], capsys)
    assert "already a mixture of experts" in cli_error(["upcycle", str(moe), "--out", str(tmp_path / "z"), "--experts", "2", "--top-k", "1"], capsys)
    assert main(base + ["--experts", "2", "--top-k", "1", "--overwrite"]) == 0


def test_show_lists_experts_and_active_parameters(dense, tmp_path, capsys):
    res = upcycle(dense, tmp_path / "moe", experts=4, top_k=1, shared=8, attention_experts=2, attention_top_k=1)
    for target in (res.run_dir, res.run_dir / "config.yaml"):
        assert main(["show", str(target)]) == 0
        printed = capsys.readouterr().out
        assert "moe: 4 experts of 6, top-1, shared expert of 8, scale 4" in printed
        assert "head groups  2 groups, top-1, scale 2" in printed and "active/token" in printed
    model = Model(res.recipe.model)
    d, m = 16, 6
    inactive_moe = 2 * 3 * 3 * d * m  # per layer: E - k = 3 experts of 3·d·m weights, two layers
    attn, eos = model.blocks[1].mixer, model.blocks[0].mixer
    inactive_heads = (attn.q_proj.weight.numel() + attn.o_proj.weight.numel()
                      + eos.o_proj.weight.numel() + eos.shrink.proj.proj.weight.numel()) // 2
    assert model.num_parameters() - model.active_parameters() == inactive_moe + inactive_heads
    assert res.record["parameters"]["active"] == model.active_parameters()
    assert f"{model.active_parameters() / 1e3:.2f}K active per token" in printed
    assert "no such file" in cli_error(["show", str(tmp_path / "nope.yaml")], capsys)


def test_moe_size_fields_are_validated():
    spec = {"d_model": 16, "n_layers": 1, "mixer": {"kind": "eos", "oscillation": {"kind": "ones"}}}
    with pytest.raises(SpecError, match="channel_mixer.hidden_size: give either hidden_size or hidden_ratio"):
        load_model_spec(spec | {"channel_mixer": {"kind": "moe", "hidden_size": 8, "hidden_ratio": 2}})
    with pytest.raises(SpecError, match="channel_mixer.shared_hidden_size: needs shared_expert: true"):
        load_model_spec(spec | {"channel_mixer": {"kind": "moe", "shared_hidden_size": 8}})
    with pytest.raises(SpecError, match="channel_mixer.output_scale"):
        load_model_spec(spec | {"channel_mixer": {"kind": "moe", "output_scale": 0}})
    model = Model.from_spec(spec | {"channel_mixer": {"kind": "moe", "experts": 4, "hidden_size": 5, "shared_expert": True,
                                                      "shared_hidden_size": 3}})
    moe = model.blocks[0].channel_mixer
    assert moe.w_gate.shape == (4, 16, 5) and moe.shared.gate_proj.weight.shape == (3, 16)


def test_the_demonstration_script_runs_end_to_end(tmp_path, capsys):
    """scripts/upcycle_demo.py --small at its smallest: every arm trains and the table is written."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "upcycle_demo.py"
    spec = importlib.util.spec_from_file_location("upcycle_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--small", "--dense-steps", "3", "--post-steps", "2", "--splits", "importance",
                      "--experts", "4", "--set", "task.val_fraction=0.01", "--device", "cpu"]) == 0
    result = json.loads((out / "results.json").read_text())
    arms = [r["arm"] for r in result["rows"]]
    assert arms == ["dense, continued", "upcycled, importance", "dense at equal active (3+2 steps from scratch)"]
    moe, small = result["rows"][1], result["rows"][2]
    assert moe["ffn"] == "4×32, top-2" and small["ffn"] == "GLU 64"  # 2 of 4 experts of 32 = 64 neurons per token
    assert abs(moe["active"] - small["active"]) == 2 * 4 * 32  # equal but for the routers (E·d per layer)
    assert all(r["loss_after"] > 0 for r in result["rows"]) and (out / "results.md").exists()


# --------------------------------------------------------------------------- the upcycled run directory
# (issue 14's run-directory rules: a verified init checkpoint, every file in the manifest, a lock)


def first_loss(run_dir, recipe) -> float:
    """The loss of run_dir's weights (as lcsm eval loads them) on the recipe's first training batch."""
    _, model, _, _ = load_run(run_dir)
    data = build_task(recipe.task, recipe.seed, run_dir=run_dir)
    seg_index, rows = epoch_batches(data.train, recipe.batch_size, recipe.seed, 0)[0]
    with torch.no_grad():
        return float(model(data.train[seg_index].inputs[rows], data.train[seg_index].labels[rows]))


def test_upcycle_writes_a_verified_init_checkpoint_and_claims_every_file(dense, tmp_path):
    from lcsm.run import files
    from lcsm.run.checkpoint import find_weights, init_checkpoint, list_checkpoints, verify

    new = upcycle(dense, tmp_path / "moe", experts=4, top_k=2, split="random").run_dir
    init = new / "checkpoint" / "init"
    manifest = json.loads((init / "manifest.json").read_text())
    assert manifest["init"] == "upcycle" and manifest["step"] == 0 and set(manifest["files"]) == {"model.safetensors"}
    assert not (new / "checkpoint" / "model.safetensors").exists() and not list(new.rglob("trainer.pt"))
    assert verify(init_checkpoint(new)) is None and list_checkpoints(new) == []  # weights, not a point to resume
    assert find_weights(new) == (init / "model.safetensors", 0) == find_weights(init)
    written = {p.relative_to(new).as_posix() for p in new.rglob("*") if p.is_file()} - {files.MANIFEST}
    owned = files.owned(new)
    assert all(path in owned or path.rsplit("/", 1)[0] in owned for path in written), written - owned
    assert {"config.yaml", "upcycle.json", "checkpoint", "checkpoint/init"} <= owned
    assert not (new / files.LOCK).exists()  # released

    # a corrupt init checkpoint is named, never loaded
    weights = init / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(RecipeError, match="model.safetensors: .*bytes, the manifest says"):
        load_run(new)
    with pytest.raises(RecipeError, match="the run's init checkpoint cannot be read; nothing was changed"):
        train(load_recipe(new / "config.yaml"), quiet=True, resume=True)  # not a random start in its place
    assert not (new / "metrics.jsonl").exists() and (init / "model.safetensors").exists()


def test_the_output_directory_is_locked_and_lcsm_overwrites_only_its_own_files(dense, tmp_path, capsys):
    from lcsm.run import lock
    from lcsm.run.lock import LockError

    out = tmp_path / "moe"
    out.mkdir()
    with lock.acquire(out, "run directory"):  # another lcsm process in it (a training, an upcycle)
        with pytest.raises(LockError, match="in use by process"):
            upcycle(dense, out, experts=4, top_k=2, split="random")
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written

    upcycle(dense, out, experts=4, top_k=2, split="random")
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint" / "mine.txt").write_text("mine too")
    upcycle(dense, out, experts=2, top_k=1, split="random", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint" / "mine.txt").read_text() == "mine too"
    assert load_run(out)[0].model.channel_mixer.experts == 2

    # a file of the user's with one of lcsm's names is never written over, even with --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "upcycle.json").write_text("{}")
    with pytest.raises(RecipeError, match="upcycle.json was not written by lcsm"):
        upcycle(dense, other, experts=4, top_k=2, split="random", overwrite=True)
    assert (other / "upcycle.json").read_text() == "{}"
    # other files: refused without --overwrite (lcsm then writes beside them)
    third = tmp_path / "third"
    third.mkdir()
    (third / "data.csv").write_text("1\n")
    assert "holds files lcsm did not write (data.csv)" in cli_error(
        ["upcycle", str(dense), "--out", str(third), "--experts", "4", "--top-k", "2", "--split", "random"], capsys)


def test_init_checkpoint_stays_beside_step_checkpoints_and_a_start_without_one_restarts_from_it(dense, tmp_path):
    from lcsm.run.checkpoint import find_weights

    new = upcycle(dense, tmp_path / "moe", experts=4, top_k=2, split="random").run_dir
    recipe = load_recipe(new / "config.yaml", ["steps=4", "eval_every=1", "checkpoint_every=1", "keep_checkpoints=1"])
    first = first_loss(new, recipe)

    def stop(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(recipe, quiet=True, init_from=new, on_step=stop).step == 2
    assert train_losses(new)[1] == pytest.approx(first, rel=1e-5)
    folders = sorted(p.name for p in (new / "checkpoint").iterdir())
    assert folders == ["init", "step-000002"]  # keep_checkpoints 1 prunes step folders only
    assert find_weights(new)[1] == 2 and find_weights(new / "checkpoint" / "init")[1] == 0

    # killed before its first checkpoint: --resume auto starts again from the init weights, not at random
    shutil.rmtree(new / "checkpoint" / "step-000002")
    (new / "metrics.jsonl").write_text((new / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    result = train(recipe, quiet=True, resume=True)
    assert result.status == "done" and result.resumed_from == 0
    assert any("from its init checkpoint" in n for n in result.notes)
    assert train_losses(new)[1] == pytest.approx(first, rel=1e-5)
    assert (new / "checkpoint" / "init" / "manifest.json").exists()


def test_an_init_checkpoint_of_the_flat_layout_still_reads_and_starts(dense, tmp_path, capsys):
    """lcsm upcycle before step folders wrote RUN/checkpoint/model.safetensors (metadata init, step 0,
    no trainer.pt) and no lcsm-files manifest: it evaluates, refuses a plain start and starts with
    --resume auto."""
    from safetensors.torch import save_model

    from lcsm.run.checkpoint import find_weights

    new = upcycle(dense, tmp_path / "moe", experts=4, top_k=2, split="random").run_dir
    _, model, _, _ = load_run(new)
    old = tmp_path / "old"
    (old / "checkpoint").mkdir(parents=True)
    (old / "config.yaml").write_text((new / "config.yaml").read_text().replace(str(new), str(old)))
    (old / "upcycle.json").write_text((new / "upcycle.json").read_text())
    save_model(model, str(old / "checkpoint" / "model.safetensors"), metadata={"step": "0", "init": "upcycle"})
    assert find_weights(old) == (old / "checkpoint" / "model.safetensors", 0)
    assert load_run(old)[3] == 0
    assert "--init-from" in cli_error(["train", str(old / "config.yaml")], capsys)
    recipe = load_recipe(old / "config.yaml", ["steps=2", "eval_every=2"])
    first = first_loss(old, recipe)
    assert train(recipe, quiet=True, resume=True).status == "done"
    assert train_losses(old)[1] == pytest.approx(first, rel=1e-5)
    assert (old / "checkpoint" / "model.safetensors").exists() and find_weights(old)[1] == 2
