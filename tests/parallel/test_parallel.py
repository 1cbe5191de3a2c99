"""Scale-out on the CPU with gloo: sequence parallelism (LASP-2 / LASP-2H) equals one process for
every oscillation kind, attention and routed layers (MoM, MoE); trainer steps on a device mesh
(DDP, FSDP2, HSDP, with SP, accumulation and clipping) equal one process's; `lcsm train --nproc`
with FSDP2, sharded checkpoints (DCP) that resume on another number of processes, a failing rank
that ends the run, and bad parallel settings that fail clearly."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
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


def routed_specs() -> dict:
    """Mixture-of-Memories and mixture-of-experts models with a balancing loss that matters (weight 1)."""
    mom = tiny("mom_gla")
    mom["mixer"]["routing"]["aux_loss_weight"] = 1.0
    # per-memory decays and convolutions, the sparse path asked for (it runs dense under SP and
    # must still equal the one-process sparse path), per-layer balancing losses
    mom_sparse = tiny("mom_scalar")
    mom_sparse["mixer"]["routing"].update(per_memory=["expand", "input", "oscillation"], path="sparse",
                                          aux_loss_weight=1.0, aux_loss_scope="per_layer")
    mom_sparse["mixer"]["expand"]["conv"] = 2
    moe = tiny("mamba2") | {"channel_mixer": {"kind": "moe", "experts": 4, "top_k": 2, "shared_expert": True,
                                              "aux_loss_weight": 1.0}}
    return {"mom_gla_aux": mom, "mom_sparse_per_memory_decay": mom_sparse, "mamba2_moe": moe}


def sp_specs() -> dict:
    # every oscillation kind, attention, short convs, the routed memories of the zoo (MoM) and
    # routed layers with a heavy balancing loss
    specs = {name: tiny(name) for name in zoo_names()}
    vector_v = tiny("gla")
    vector_v["mixer"]["oscillation"] = {"kind": "vector_v", "source": "data", "parametrization": "sigmoid_tau", "tau": 16}
    specs["vector_v"] = vector_v
    static = tiny("gla")
    static["mixer"]["oscillation"] = {"kind": "vector_k", "source": "param", "parametrization": "sigmoid_tau", "tau": 16}
    specs["vector_k_param"] = static
    routed = tiny("hybrid_gla")  # attention experts on EOS and attention layers (head routing)
    for mixer in (routed["mixer"], *routed["mixers"].values()):
        mixer["head_routing"] = {"groups": 2, "top_k": 1}
    specs["hybrid_head_routing"] = routed
    return specs | routed_specs()


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    # the tasks' generated data of this module's runs (in-process and in the launched processes)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LCSM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def spawn(fn, world: int, *args):
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


@pytest.fixture(scope="module")
def on_mesh(tmp_path_factory):
    """world -> {"sp": {spec: error}, "steps": {case: error}}: one spawn of `world` processes runs
    the sequence-parallel specs and then the trainer-step cases of that world (on first use);
    starting the processes costs more than most cases."""
    cache = {}

    def results(world: int) -> dict:
        if world not in cache:
            specs = sp_specs()
            if world == 4:
                # four slices: the middle ranks' prefix states go through the decay of the slices between
                specs = {n: specs[n] for n in FOUR_RANKS}
            routed = routed_specs()
            cases = {name: {k: v for k, v in case.items() if k != "model"} | {"spec": routed.get(case.get("model")) or tiny("mamba2")}
                     for name, case in STEP_CASES[world].items()}
            out = tmp_path_factory.mktemp(f"mesh{world}") / "errors.json"
            spawn(parallel_workers.mesh_worker, world, specs, 2, 16, cases, str(out))
            cache[world] = json.loads(out.read_text())
        return cache[world]

    return results


@pytest.mark.parametrize("name", sorted(sp_specs()))
def test_sequence_parallel_equals_one_process(on_mesh, name):
    # logits, the balancing loss and every parameter's gradient, fp64
    error = on_mesh(2)["sp"][name]
    assert error < 1e-9, error


FOUR_RANKS = ["gla", "retnet", "mamba2", "hybrid_gla", "vector_v", "mom_gla_aux"]


@pytest.mark.parametrize("name", FOUR_RANKS)
def test_sequence_parallel_over_four_ranks_equals_one_process(on_mesh, name):
    error = on_mesh(4)["sp"][name]
    assert error < 1e-9, error


# Trainer steps on a device mesh against one process on the whole batch: several AdamW steps,
# fp64, the model (Mamba-2: short convolutions) and an unevenly labelled batch; every strategy of
# parallel.strategy runs on the CPU (DDP, and FSDP2's fully_shard on gloo), with and without
# sequence parallelism, gradient accumulation and clipping (the clipped norm must be one
# process's). Routed layers (MoM, MoE) under SP alone: their balancing loss is then exactly one
# process's (over data ranks it is averaged, as in one process with accumulation).
STEP_CASES = {
    2: {
        "ddp_data2_clip": dict(grad_clip=0.05),
        "fsdp_data2_clip": dict(strategy="fsdp", grad_clip=0.05),
        "fsdp_sequence2": dict(strategy="fsdp", sequence=2),
        "ddp_sequence2_accumulate2": dict(sequence=2, accumulate=2),
        "hsdp_data2_shard1_accumulate2_clip": dict(strategy="hsdp", shard=1, accumulate=2, grad_clip=0.05),
        "mom_fsdp_sequence2_clip": dict(model="mom_gla_aux", strategy="fsdp", sequence=2, grad_clip=0.05),
        # bf16 on the CPU too (autocast; FSDP2 gathers bf16 parameters and reduces in fp32): close, not equal
        "fsdp_bf16_clip": dict(strategy="fsdp", precision="bf16", grad_clip=0.05),
    },
    4: {
        "fsdp_sequence2_data2_accumulate2_clip": dict(strategy="fsdp", sequence=2, accumulate=2, grad_clip=0.05),
        "hsdp_data4_shard2_accumulate2_clip": dict(strategy="hsdp", shard=2, accumulate=2, grad_clip=0.05),
    },
}


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in STEP_CASES.items() for c in cases])
def test_trainer_steps_on_a_mesh_equal_one_process(on_mesh, world, case):
    error = on_mesh(world)["steps"][case]
    assert error < (2e-2 if STEP_CASES[world][case].get("precision") == "bf16" else 1e-10), error


def _env() -> dict:
    # the subprocesses import this checkout's lcsm (the editable install may point elsewhere)
    root = str(Path(__file__).resolve().parents[2])
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def _close(a: dict, b: dict, steps=None, tol=1e-5) -> bool:
    keys = sorted(steps if steps is not None else a)
    return all(k in a and k in b and abs(a[k] - b[k]) <= tol * abs(a[k]) for k in keys)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The tiny recipe (4 steps) and its losses in one process."""
    from lcsm.config.recipe import load_recipe
    from lcsm.run.trainer import train
    from helpers import tiny as tiny_recipe, train_losses

    tmp = tmp_path_factory.mktemp("one")
    data = tiny_recipe(tmp, steps=4, eval_every=4, threads=1)
    return data, train_losses(train(load_recipe(data), quiet=True).run_dir)


def test_lcsm_train_fsdp_on_two_processes_matches_one_and_its_checkpoint_reads_in_one(one_process, tmp_path):
    # the real CLI under torchrun: 2 processes splitting every sequence (LASP-2, short convs) with
    # the weights sharded (FSDP2), the same losses as one process; its sharded checkpoint then
    # evaluates in one process, and exports to one safetensors file that evaluates the same
    from lcsm.cli.main import main
    from helpers import train_losses

    data, a = one_process
    data = data | {"out_dir": str(tmp_path / "two")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "lcsm.cli", "train", str(path), "--nproc", "2", "--set", "parallel.sequence=2",
           "--set", "parallel.strategy=fsdp"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = train_losses(tmp_path / "two")
    assert a.keys() == b.keys() and _close(a, b), (a, b)
    assert (tmp_path / "two" / "checkpoint" / "dcp" / ".metadata").exists()
    assert not list((tmp_path / "two" / "checkpoint").glob("step-*"))
    from lcsm.run.evaluate import read_eval

    saved = read_eval(tmp_path / "two" / "eval.json").metrics  # (the eval schema: lcsm/run/evaluate.py)
    assert main(["eval", str(tmp_path / "two"), "--device", "cpu", "-o", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["step"] == 4 and abs(again["metrics"]["loss"] - saved["loss"]) < 1e-6
    exported = tmp_path / "two" / "exported.safetensors"  # beside config.yaml: lcsm eval reads it
    assert main(["export", str(tmp_path / "two"), "--out", str(exported)]) == 0
    assert main(["eval", str(exported), "--device", "cpu", "-o", str(tmp_path / "e2.json")]) == 0
    assert json.loads((tmp_path / "e2.json").read_text())["metrics"]["loss"] == again["metrics"]["loss"]


def test_lcsm_export_of_a_replicated_run_and_its_errors(one_process, tmp_path, capsys):
    from safetensors import safe_open

    from lcsm.cli.main import main
    from helpers import cli_error

    data, _ = one_process
    out = tmp_path / "w.safetensors"
    assert main(["export", data["out_dir"], "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["step"] == "4" and "embed.weight" in f.keys()
    assert "must end in .safetensors" in cli_error(["export", data["out_dir"], "--out", str(tmp_path / "w.pt")], capsys)
    assert "exists; pass --overwrite" in cli_error(["export", data["out_dir"], "--out", str(out)], capsys)
    assert "no such run directory" in cli_error(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "v.safetensors")], capsys)
    assert "does not exist" in cli_error(["export", data["out_dir"], "--out", str(tmp_path / "no" / "w.safetensors")], capsys)


def test_a_one_process_checkpoint_resumes_sharded_on_two(one_process, tmp_path):
    # the replicated checkpoint (model.safetensors + trainer.pt) of one process, resumed by
    # `lcsm train --nproc 2` with FSDP2: read whole, then sharded; then written through DCP
    from lcsm.config.recipe import load_recipe
    from lcsm.run.trainer import train
    from helpers import train_losses

    data, a = one_process
    data = data | {"out_dir": str(tmp_path / "three")}

    def ctrl_c(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(load_recipe(data), quiet=True, on_step=ctrl_c).status == "interrupted"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "lcsm.cli", "train", str(path), "--nproc", "2", "--set", "parallel.strategy=fsdp",
           "--resume", "auto"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 2" in " ".join(proc.stdout.split())  # it resumed from the checkpoint, not from scratch
    c = train_losses(tmp_path / "three")
    assert c.keys() == a.keys() and _close(a, c), (a, c)
    checkpoint = tmp_path / "three" / "checkpoint"
    assert (checkpoint / "dcp").is_dir() and not list(checkpoint.glob("step-*"))  # the stale format is gone


KILL_AT, STEPS = 3, 6


def _kill_recipe(tmp_path, out: str, **fields) -> dict:
    from helpers import tiny as tiny_recipe

    return tiny_recipe(tmp_path, steps=STEPS, eval_every=STEPS, checkpoint_every=KILL_AT, threads=1, out_dir=out, **fields)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A 2-process FSDP2 run killed (SIGKILL, every rank) right after its step-3 checkpoint, and
    the losses of the same recipe run to the end in one process."""
    from lcsm.config.recipe import load_recipe
    from lcsm.run.trainer import train
    from helpers import train_losses

    tmp = tmp_path_factory.mktemp("killed")
    reference = train_losses(train(load_recipe(_kill_recipe(tmp, str(tmp / "one"))), quiet=True).run_dir)
    data = _kill_recipe(tmp, str(tmp / "killed"), parallel={"data": 2, "strategy": "fsdp"})
    with pytest.raises(mp.ProcessExitedException, match="signal SIGKILL"):
        spawn(parallel_workers.train_worker, 2, data, KILL_AT, False)
    return tmp / "killed", reference


def _resume_copy(killed: Path, tmp_path: Path, parallel: dict) -> tuple[Path, dict]:
    from helpers import train_losses

    run = tmp_path / "run"
    shutil.copytree(killed, run)
    assert max(train_losses(run)) == KILL_AT  # killed: nothing after the checkpoint's step
    return run, _kill_recipe(tmp_path, str(run), parallel=parallel)


def test_a_killed_two_process_run_resumes_on_one(killed_run, tmp_path):
    from lcsm.config.recipe import load_recipe
    from lcsm.run.dcp import newest_step
    from lcsm.run.trainer import train
    from helpers import train_losses

    killed, reference = killed_run
    assert newest_step(killed) == KILL_AT and (killed / "checkpoint" / "dcp" / "lcsm.json").exists()
    run, data = _resume_copy(killed, tmp_path, {})
    result = train(load_recipe(data), resume=True, quiet=True)
    assert result.status == "done" and result.resumed_from == KILL_AT
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1)) and _close(reference, losses), (reference, losses)
    assert (run / "checkpoint" / f"step-{STEPS:06d}" / "model.safetensors").exists() and not (run / "checkpoint" / "dcp").exists()


def test_a_killed_two_process_run_resumes_on_four(killed_run, tmp_path):
    # four ranks, HSDP (2 replicas of 2 shards): DCP reshards the 2-rank checkpoint on load
    from helpers import train_losses

    killed, reference = killed_run
    run, data = _resume_copy(killed, tmp_path, {"data": 4, "strategy": "hsdp", "shard": 2})
    spawn(parallel_workers.train_worker, 4, data, None, True)
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1)) and _close(reference, losses), (reference, losses)
    info = json.loads((run / "checkpoint" / "dcp" / "lcsm.json").read_text())
    assert info["step"] == STEPS and info["world"] == 4 and info["strategy"] == "hsdp"


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path):
    # rank 1 raises in its second step while rank 0 waits for it in a collective: torchrun must
    # end the run (no hang) and the error must be shown
    import time

    from helpers import tiny as tiny_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, steps=4, threads=1, parallel={"data": 2, "strategy": "fsdp"})))
    script = Path(__file__).parent / "failing_rank.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), "train", str(path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    # torchrun's summary names the first failure, rank 1, with its error (not only rank 0's lost peer)
    assert re.search(r"Root Cause.*?rank\s*: 1 .*?injected failure on rank 1", proc.stderr, re.S), proc.stderr[-3000:]
    assert time.perf_counter() - start < 120


def test_bad_parallel_settings_fail_clearly(tmp_path, capsys):
    from lcsm.config.recipe import RecipeError, load_recipe
    from lcsm.parallel.grid import ParallelError, check_sizes
    from lcsm.run.trainer import train
    from helpers import cli_error, tiny as tiny_recipe

    with pytest.raises(RecipeError, match=r"parallel.data: data = 3 must divide batch_size = 16"):
        load_recipe(tiny_recipe(tmp_path, parallel={"data": 3}))
    with pytest.raises(RecipeError, match=r"parallel.sequence: .*greater than or equal to 1"):
        load_recipe(tiny_recipe(tmp_path, parallel={"sequence": 0}))
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(tiny_recipe(tmp_path, parallel={"tensor": 2}))
    with pytest.raises(RecipeError, match=r"parallel.strategy: 'zero3' is not allowed; allowed: ddp, fsdp, hsdp"):
        load_recipe(tiny_recipe(tmp_path, parallel={"strategy": "zero3"}))
    with pytest.raises(RecipeError, match=r"parallel.shard: strategy hsdp needs shard"):
        load_recipe(tiny_recipe(tmp_path, parallel={"data": 4, "strategy": "hsdp"}))
    with pytest.raises(RecipeError, match=r"parallel.shard: shard only applies with strategy: hsdp"):
        load_recipe(tiny_recipe(tmp_path, parallel={"data": 4, "shard": 2}))
    with pytest.raises(RecipeError, match=r"accumulate: accumulate × parallel.data = 3 × 1 must divide batch_size = 16"):
        load_recipe(tiny_recipe(tmp_path, accumulate=3))
    with pytest.raises(ParallelError, match=r"parallel.shard: strategy hsdp needs shard, a divisor of data = 4 \(got 3\)"):
        check_sizes(1, 4, 4, "hsdp", 3)
    # a mesh of 2 in a single process: says how to launch
    with pytest.raises(RecipeError, match="launch with torchrun or lcsm train --nproc N"):
        train(load_recipe(tiny_recipe(tmp_path, parallel={"sequence": 2})), quiet=True)
    # --nproc that does not fit the recipe's mesh: exit 2 before anything is launched
    out = f"out_dir={tmp_path}/x"
    assert "parallel: sequence × data" in cli_error(["train", "--nproc", "3", "--set", "parallel.sequence=2", "--set", out], capsys)
    assert "parallel.shard: strategy hsdp needs shard, a divisor of data = 4 (got 3)" in cli_error(
        ["train", "--nproc", "4", "--set", "parallel.strategy=hsdp", "--set", "parallel.shard=3", "--set", out], capsys)


def test_grid_shards_rows_and_slices_and_rejects_uneven_slices():
    from lcsm.parallel.grid import Grid, ParallelError, check_sizes, mesh_shape

    x = torch.arange(5 * 8).view(5, 8)
    grid = Grid(world=4, rank=3, sequence=2, data=2, sp_rank=1, dp_rank=1)
    assert torch.equal(grid.shard(x), x[3:, 4:])  # rows split as evenly as they go (a short last batch)
    with pytest.raises(ParallelError, match=r"parallel.sequence = 2 must divide the sequence length \(here 7 tokens\)"):
        grid.shard(x[:, :7])
    with pytest.raises(ParallelError, match=r"sequence × data = 2 × 2 = 4 must equal the number of processes \(3\)"):
        check_sizes(2, 2, 3)
    # (dp_replicate, dp_shard, sp) of each strategy
    assert mesh_shape(2, 4, "ddp", None) == (4, 1, 2)
    assert mesh_shape(2, 4, "fsdp", None) == (1, 4, 2)
    assert mesh_shape(2, 4, "hsdp", 2) == (2, 2, 2)


def test_an_unreadable_sharded_checkpoint_falls_back_to_the_previous_one(tmp_path):
    # a 2-process FSDP2 run checkpointing every 2 steps, killed after its step-4 checkpoint: dcp/
    # (step 4) and dcp.prev/ (step 2). With dcp/'s shard files cut short, --resume auto reports
    # it, keeps it as dcp.unreadable/ and resumes from step 2 with the same losses as one process
    from lcsm.config.recipe import load_recipe
    from lcsm.run.dcp import newest_step
    from lcsm.run.trainer import train
    from helpers import tiny as tiny_recipe, train_losses

    def recipe(out, **fields):
        return tiny_recipe(tmp_path, steps=6, eval_every=6, checkpoint_every=2, threads=1, out_dir=str(out), **fields)

    reference = train_losses(train(load_recipe(recipe(tmp_path / "one")), quiet=True).run_dir)
    run = tmp_path / "run"
    with pytest.raises(mp.ProcessExitedException, match="signal SIGKILL"):
        spawn(parallel_workers.train_worker, 2, recipe(run, parallel={"data": 2, "strategy": "fsdp"}), 4, False)
    checkpoint = run / "checkpoint"
    assert newest_step(run) == 4 and json.loads((checkpoint / "dcp.prev" / "lcsm.json").read_text())["step"] == 2
    shards = list((checkpoint / "dcp").glob("*.distcp"))
    assert shards
    for f in shards:
        f.write_bytes(f.read_bytes()[:64])  # the shards cut short (their first bytes only)
    from lcsm.cli.main import main

    assert main(["eval", str(run), "--device", "cpu", "-o", str(tmp_path / "e.json")]) == 0  # read whole, one process
    assert json.loads((tmp_path / "e.json").read_text())["step"] == 2 and (checkpoint / "dcp").is_dir()  # (left in place)
    result = train(load_recipe(recipe(run)), resume=True, quiet=True)
    assert result.status == "done" and result.resumed_from == 2
    note = next(n for n in result.notes if "cannot read the checkpoint" in n)
    assert "resuming from the previous checkpoint, step 2" in note, note
    assert (checkpoint / "dcp.unreadable" / "lcsm.json").exists()  # kept, not deleted
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 7)) and _close(reference, losses), (reference, losses)
