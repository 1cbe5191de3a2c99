"""Scale-out on the CPU with gloo: sequence parallelism (LASP-2 / LASP-2H) equals one process for
every oscillation kind and for attention, a data-parallel step equals the single-process step,
and bad parallel settings fail clearly."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lcsm.throughput import resized
from lcsm.zoo import zoo_names
from tests import parallel_workers

TINY = dict(d_model=16, n_layers=2, n_heads=2, vocab=32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(name: str) -> dict:
    from lcsm.spec import load_model_spec

    pattern = load_model_spec(name).pattern
    size = TINY | ({"n_layers": len(pattern)} if pattern else {})
    return resized(name, **size).model_dump(mode="json", exclude_unset=True) | {"vocab_size": TINY["vocab"]}


def sp_specs() -> dict:
    specs = {name: tiny(name) for name in zoo_names()}  # every oscillation kind, attention, short convs
    vector_v = tiny("gla")
    vector_v["mixer"]["oscillation"] = {"kind": "vector_v", "source": "data", "parametrization": "sigmoid_tau", "tau": 16}
    specs["vector_v"] = vector_v
    static = tiny("gla")
    static["mixer"]["oscillation"] = {"kind": "vector_k", "source": "param", "parametrization": "sigmoid_tau", "tau": 16}
    specs["vector_k_param"] = static
    moe = tiny("mamba2") | {"channel_mixer": {"kind": "moe", "experts": 4, "top_k": 2, "shared_expert": True}}
    specs["mamba2_moe"] = moe  # token-local: must not notice the split
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


@pytest.mark.parametrize("world,sequence", [(2, 1), (4, 2)], ids=["data2", "sequence2xdata2"])
def test_parallel_step_equals_single_process_step(tmp_path, world, sequence):
    # one AdamW step on a (sequence × data) grid against one process on the whole batch; the model
    # has short convolutions and an unevenly labelled batch (the mean is over labelled tokens)
    out = tmp_path / "dp.json"
    spawn(parallel_workers.data_parallel_worker, world, tiny("mamba2"), str(out), sequence)
    assert json.loads(out.read_text())["error"] < 1e-8
