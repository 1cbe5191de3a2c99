"""The benchmark scaffold (lcsm/bench/common.py): argument checks that name the flag, results
files, tables, the environment record, timers, the CUDA requirement and the standalone entry."""

import argparse
import json

import pytest
import torch

from lcsm.bench import common
from lcsm.bench.common import BenchError
from lcsm.config.base import SpecError


def test_bench_error_is_a_spec_error():
    # lcsm.cli.main catches SpecError: printed without a traceback, exit code 2
    assert issubclass(BenchError, SpecError)


def test_argument_checks_name_the_flag():
    args = argparse.Namespace(steps=0, d_model=64, warmup=-1, contexts=[64, 0], nproc=None)
    with pytest.raises(BenchError, match=r"^--steps must be at least 1 \(got 0\)$"):
        common.positive(args, "d_model", "steps")
    with pytest.raises(BenchError, match=r"^--warmup must be at least 0 \(got -1\)$"):
        common.non_negative(args, "warmup")
    with pytest.raises(BenchError, match=r"^--contexts: every value must be at least 1 \(got 64 0\)$"):
        common.positive(args, "contexts")
    common.positive(args, "d_model", "nproc")  # None: not given, nothing to check
    assert common.flag("longest_start") == "--longest-start"


def test_json_paths_are_checked(tmp_path):
    with pytest.raises(BenchError, match="must end in .json"):
        common.check_json_path(str(tmp_path / "results.txt"))
    with pytest.raises(BenchError, match="does not exist"):
        common.check_json_path(str(tmp_path / "missing" / "results.json"))
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(BenchError, match="is a folder"):
        common.write_json(str(tmp_path / "dir.json"), {})
    path = tmp_path / "results.json"
    common.write_json(str(path), {"rows": [{"shape": (1, 2)}], "dtype": torch.bfloat16})
    common.write_json(str(path), {"rows": [1]})  # rewritten, as after every row
    assert json.loads(path.read_text()) == {"rows": [1]}
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["results.json"]  # no temporary left


def test_markdown_table_and_cells():
    text = common.markdown_table(["a", "b"], [[1, common.cell(2.5, ".2f")], ["x", common.cell(None)]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2.50 |", "| x | — |"]
    assert common.cell("out of memory") == "out of memory" and common.cell(3, ".1f") == "3.0"


def test_environment_keys(monkeypatch):
    env = common.environment(torch.device("cpu"), world=2)
    keys = {"date", "gpu", "device", "torch", "cuda", "triton", "fla", "fla_core", "flash_linear_attention", "python"}
    assert keys <= set(env) and env["world"] == 2
    assert env["gpu"] is None and env["device"] == "cpu" and env["torch"] == torch.__version__
    assert len(env["date"]) == 10 and env["triton"]  # YYYY-MM-DD; triton is installed here
    json.dumps(env)  # a JSON record


def test_require_cuda_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BenchError, match="lcsm bench x needs a CUDA GPU.*; use --small"):
        common.require_cuda("lcsm bench x", "use --small")


def test_host_timers_count_the_calls():
    calls = []
    ms = common.mean_ms(lambda: calls.append(1), 3, torch.device("cpu"), warmup=2)
    assert len(calls) == 5 and ms >= 0
    with common.Stopwatch(torch.device("cpu")) as clock:
        sum(range(1000))
    assert clock.s >= 0 and clock.ms == clock.s * 1e3


def test_guard_keeps_the_other_rows():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    def broken():
        raise RuntimeError("no kernel for this case")

    assert common.guard(oom) == {"error": "out of memory"}
    assert common.guard(broken, catch_all=True) == {"error": "RuntimeError: no kernel for this case"}
    with pytest.raises(RuntimeError):
        common.guard(broken)  # only a row that does not fit is recorded by default
    assert common.guard(lambda: {"ms": 1.0}) == {"ms": 1.0}


def test_resized_is_validated_and_importable_from_bench_train():
    from lcsm.bench.train import resized

    assert resized is common.resized
    spec = resized("gla", 32, 2, 2, 64)
    assert (spec.d_model, spec.n_layers, spec.n_heads, spec.vocab_size) == (32, 2, 2, 64)
    with pytest.raises(BenchError, match="n_heads = 3 must divide d_model = 16"):
        resized("gla", 16, 2, 3, 64)


def test_the_standalone_entry_prints_errors_with_exit_code_2(capsys):
    from lcsm.bench import train

    assert train.main(["--steps", "0"]) == 2
    assert "error: --steps must be at least 1 (got 0)" in capsys.readouterr().err


def test_bench_train_shapes_and_the_fla_counterparts():
    from lcsm.bench.train import fla_config, parse_shapes, table

    assert parse_shapes("8x2048, 2X8192,1x32768") == [(8, 2048), (2, 8192), (1, 32768)]
    assert fla_config("cumsoftmax", 64, 2, 4, 100) is None  # fla has no counterpart
    rows = [{"model": "gla", "impl": "lcsm", "B": 2, "T": 8, "params_M": 1.0, "tokens_per_s": 100.0, "peak_GiB": 2.0},
            {"model": "gla", "impl": "fla", "B": 2, "T": 8, "params_M": 1.2, "tokens_per_s": 50.0, "peak_GiB": 4.0},
            {"model": "transformer", "impl": "lcsm", "B": 2, "T": 8, "params_M": 1.0, "tokens_per_s": 80.0, "peak_GiB": 1.0}]
    text = table(rows)
    assert "| 2×8 | gla | 1.0 | 100 | 2.0 | 50 | 4.0 | 2.00 | 0.50 | 1.25 |" in text


def test_variants_are_rows_of_their_own_beside_the_same_variant_of_the_transformer():
    from lcsm.bench.train import parse_variant, table

    assert parse_variant("compile+segments") == {"compile": {}, "state_segments": "auto"}
    assert parse_variant("graphs") == {"compile": {"mode": "reduce-overhead"}}
    row = {"B": 1, "T": 8, "params_M": 1.0, "peak_GiB": 1.0, "impl": "lcsm"}
    rows = [{**row, "model": "gla", "variant": "eager", "tokens_per_s": 100.0},
            {**row, "model": "gla", "variant": "compile", "tokens_per_s": 300.0},
            {**row, "model": "transformer", "variant": "eager", "tokens_per_s": 50.0},
            {**row, "model": "transformer", "variant": "compile", "tokens_per_s": 100.0},
            {**row, "model": "gla", "variant": "segments", "tokens_per_s": 150.0}]
    text = table(rows)
    assert "| 1×8 | gla | 1.0 | 100 | 1.0 | — | — | — | — | 2.00 |" in text
    assert "| 1×8 | gla [compile] | 1.0 | 300 | 1.0 | — | — | — | — | 3.00 |" in text
    assert "| 1×8 | gla [segments] | 1.0 | 150 | 1.0 | — | — | — | — | 3.00 |" in text  # no such transformer: the eager one


def test_a_variant_sets_the_state_segments_only_for_its_run():
    from lcsm.kernels import state_segments
    from lcsm.kernels.triton import autograd

    before = autograd.STATE_SEGMENTS
    with state_segments("auto"):
        assert autograd.STATE_SEGMENTS == "auto"
        with state_segments(4):
            assert autograd.STATE_SEGMENTS == 4
        assert autograd.STATE_SEGMENTS == "auto"
    assert autograd.STATE_SEGMENTS == before


def test_kernel_kinds_by_name():
    assert common.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert common.kernel_kind("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_NTN") == "gemm"
    assert common.kernel_kind("chunk_dqdk_gk_kernel") == "recurrence"
    assert common.kernel_kind("triton_per_fused__to_copy_mul_rsqrt_0") == "compiled"
    assert common.kernel_kind("void at::native::vectorized_elementwise_kernel<4, ...>") == "pointwise/reduce"
    assert common.kernel_kind("something_unheard_of") == "other"


def test_train_profile_of_a_small_model_on_the_cpu():
    # `lcsm bench train --profile N` on a CPU-sized model: the profile's kinds add up to its total,
    # and the table prints both columns (on the CPU the times are the operators' CPU times)
    from lcsm.bench import train

    spec = common.resized("gla", 32, 1, 2, 64)
    row = train.measure(spec, 1, 16, steps=1, warmup=1, device=torch.device("cpu"), profile=1)
    prof = row["profile"]
    assert prof["ms"] > 0 and prof["kernels"]
    assert abs(sum(prof["kinds"].values()) - prof["ms"]) < 1e-6 * max(1.0, prof["ms"])
    rows = [{"model": "gla", "impl": "lcsm", "B": 1, "T": 16, **row},
            {"model": "gla", "impl": "fla", "B": 1, "T": 16, **row}]
    text = train.profiles(rows)
    assert "1×16: device time per step" in text and "| kind of kernel (ms per step) | lcsm gla | fla gla |" in text
    assert "longest kernels" in text


def test_delta_check_with_beta_near_one_and_the_finite_check_on_the_cpu():
    # the bf16 check of `lcsm bench kernels --check-only` and `--finite-tokens`, run here in fp32 under
    # the Triton interpreter (its bf16 emulation is not what the GPU computes): β in [0.9, 1] and
    # strong gates give finite values within round-off of the fp64 oracle
    from lcsm.bench import kernels

    cpu = torch.device("cpu")
    res = kernels.check_form("delta_scalar", (1, 40, 1, 16), cpu, scale=5.0, with_fla=False,
                             dtype=torch.float32, beta="near_one")
    assert res["beta"] == "near_one" and res["ours"]["finite"] == 1.0
    assert max(v for k, v in res["ours"].items() if k != "finite") < 1e-5
    out = kernels.check_finite("delta_vector_k", 80, 1, 16, cpu, scale=5.0, dtype=torch.float32)
    assert out["finite"] and out["max_abs_y"] < 100
