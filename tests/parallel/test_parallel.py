"""Scale-out on the CPU with gloo: sequence parallelism (LASP-2 / LASP-2H) equals one process for
every oscillation kind and for attention, a data-parallel step equals the single-process step,
and bad parallel settings fail clearly."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lcsm.bench.train import resized
from lcsm.config.paths import zoo_names
import parallel_workers  # tests/ is on sys.path (pytest puts a test file's folder there)

TINY = dict(d_model=16, n_layers=2, n_heads=2, vocab=32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(name: str) -> dict:
    from lcsm.config.spec import load_model_spec

    pattern = load_model_spec(name).pattern
    size = TINY | ({"n_layers": len(pattern)} if pattern else {})
    return resized(name, **size).model_dump(mode="json", exclude_unset=True) | {"vocab_size": TINY["vocab"]}


def sp_specs() -> dict:
    # every oscillation kind, attention, short convs; routed memories (MoM) refuse sequence
    # parallelism with a clear error instead (tests/nn/test_mom.py)
    specs = {name: tiny(name) for name in zoo_names() if not tiny(name)["mixer"].get("routing")}
    vector_v = tiny("gla")
    vector_v["mixer"]["oscillation"] = {"kind": "vector_v", "source": "data", "parametrization": "sigmoid_tau", "tau": 16}
    specs["vector_v"] = vector_v
    static = tiny("gla")
    static["mixer"]["oscillation"] = {"kind": "vector_k", "source": "param", "parametrization": "sigmoid_tau", "tau": 16}
    specs["vector_k_param"] = static
    moe = tiny("mamba2") | {"channel_mixer": {"kind": "moe", "experts": 4, "top_k": 2, "shared_expert": True}}
    specs["mamba2_moe"] = moe  # token-local: must not notice the split
    routed = tiny("hybrid_gla")  # attention experts on EOS and attention layers: token-local too
    for mixer in (routed["mixer"], *routed["mixers"].values()):
        mixer["head_routing"] = {"groups": 2, "top_k": 1}
    specs["hybrid_head_routing"] = routed
    return specs


def spawn(fn, world: int, *args):
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


@pytest.fixture(scope="module")
def sp_errors(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "errors.json"
    spawn(parallel_workers.sequence_parallel_worker, 2, sp_specs(), str(out), 2, 16)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(sp_specs()))
def test_sequence_parallel_equals_one_process(sp_errors, name):
    # logits and every parameter's gradient, fp64
    assert sp_errors[name] < 1e-9, sp_errors[name]


FOUR_RANKS = ["gla", "retnet", "mamba2", "hybrid_gla", "vector_v"]


@pytest.fixture(scope="module")
def sp4_errors(tmp_path_factory):
    # four slices: the middle ranks' prefix states go through the decay of the slices between
    out = tmp_path_factory.mktemp("sp4") / "errors.json"
    specs = sp_specs()
    spawn(parallel_workers.sequence_parallel_worker, 4, {n: specs[n] for n in FOUR_RANKS}, str(out), 2, 16)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", FOUR_RANKS)
def test_sequence_parallel_over_four_ranks_equals_one_process(sp4_errors, name):
    assert sp4_errors[name] < 1e-9, sp4_errors[name]


@pytest.mark.parametrize("world,sequence", [(2, 1), (4, 2)], ids=["data2", "sequence2xdata2"])
def test_parallel_step_equals_single_process_step(tmp_path, world, sequence):
    # one AdamW step on a (sequence × data) grid against one process on the whole batch; the model
    # has short convolutions and an unevenly labelled batch (the mean is over labelled tokens)
    out = tmp_path / "dp.json"
    spawn(parallel_workers.data_parallel_worker, world, tiny("mamba2"), str(out), sequence)
    assert json.loads(out.read_text())["error"] < 1e-8


def test_lcsm_train_nproc_matches_one_process_and_checkpoint_loads_on_one(tmp_path, monkeypatch):
    # the real CLI under torchrun: 2 processes splitting every sequence (LASP-2, short convs),
    # the same losses as one process; the checkpoint then loads and evaluates in one process
    import os
    import subprocess
    import sys

    import yaml

    from lcsm.run.trainer import train
    from lcsm.config.recipe import load_recipe
    from helpers import tiny as tiny_recipe, train_losses

    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))
    data = tiny_recipe(tmp_path / "one", steps=4, eval_every=4, threads=1)
    one = train(load_recipe(data), quiet=True)
    data["out_dir"] = str(tmp_path / "two")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lcsm.cli", "train", str(path), "--nproc", "2", "--set", "parallel.sequence=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train_losses(one.run_dir), train_losses(tmp_path / "two")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 * abs(a[k]) for k in a), (a, b)
    from lcsm.run.evaluate import read_eval

    saved = read_eval(tmp_path / "two" / "eval.json").metrics  # (the eval schema: lcsm/run/evaluate.py)
    proc = subprocess.run([sys.executable, "-m", "lcsm.cli", "eval", str(tmp_path / "two"), "-o", str(tmp_path / "e.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert abs(again["loss"] - saved["loss"]) < 1e-6

    # a run checkpointed by one process resumes on two (parallel may change on --resume auto)
    import signal

    data["out_dir"] = str(tmp_path / "three")

    def ctrl_c(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(load_recipe(data), quiet=True, on_step=ctrl_c).status == "interrupted"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run(cmd[:-2] + ["--set", "parallel.sequence=2", "--resume", "auto"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 2" in " ".join(proc.stdout.split())  # it resumed from the checkpoint, not from scratch
    c = train_losses(tmp_path / "three")
    assert c.keys() == a.keys() and all(abs(a[k] - c[k]) < 1e-4 * abs(a[k]) for k in a), (a, c)


def test_bad_parallel_settings_fail_clearly(tmp_path):
    from lcsm.cli.main import main
    from lcsm.config.recipe import RecipeError, load_recipe
    from lcsm.run.trainer import train
    from helpers import tiny as tiny_recipe

    with pytest.raises(RecipeError, match=r"parallel.data: data = 3 must divide batch_size = 16"):
        load_recipe(tiny_recipe(tmp_path, parallel={"data": 3}))
    with pytest.raises(RecipeError, match=r"parallel.sequence: .*greater than or equal to 1"):
        load_recipe(tiny_recipe(tmp_path, parallel={"sequence": 0}))
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(tiny_recipe(tmp_path, parallel={"tensor": 2}))
    # a grid of 2 in a single process: says how to launch
    with pytest.raises(RecipeError, match="launch with torchrun or lcsm train --nproc N"):
        train(load_recipe(tiny_recipe(tmp_path, parallel={"sequence": 2})), quiet=True)
    assert main(["train", "--nproc", "3", "--set", "parallel.sequence=2", "--set", f"out_dir={tmp_path}/x"]) == 2


def test_grid_shards_rows_and_slices_and_rejects_uneven_slices():
    from lcsm.parallel.grid import Grid, ParallelError, check_sizes

    x = torch.arange(5 * 8).view(5, 8)
    grid = Grid(world=4, rank=3, sequence=2, data=2, sp_rank=1, dp_rank=1)
    assert torch.equal(grid.shard(x), x[3:, 4:])  # rows split as evenly as they go (a short last batch)
    with pytest.raises(ParallelError, match=r"parallel.sequence = 2 must divide the sequence length \(here 7 tokens\)"):
        grid.shard(x[:, :7])
    with pytest.raises(ParallelError, match=r"sequence × data = 2 × 2 = 4 must equal the number of processes \(3\)"):
        check_sizes(2, 2, 3)


def test_gradient_sync_keeps_missing_gradients_missing(tmp_path):
    out = tmp_path / "grads.json"
    spawn(parallel_workers.gradient_presence_worker, 2, str(out))
    assert json.loads(out.read_text())["ok"]
