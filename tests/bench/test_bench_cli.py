"""`lcsm bench NAME` refuses bad flags, bad --json paths and a machine without CUDA with a clear
message and exit code 2 (no traceback), before anything is measured."""

import pytest
import torch
from helpers import cli_error  # tests/ is on sys.path (tests/conftest.py's folder)


@pytest.mark.parametrize("args, words", [
    (["bench", "train", "--steps", "0"], "--steps must be at least 1 (got 0)"),
    (["bench", "train", "--warmup", "-1"], "--warmup must be at least 0 (got -1)"),
    (["bench", "train", "--heads", "5"], "n_heads = 5 must divide d_model = 1024"),
    (["bench", "train", "--shapes", "8x2048,2by8192"], "--shapes: '2by8192' is not BxT"),
    (["bench", "train", "--variants", "eager", "compile+fast"], "--variants: 'fast' is not one of eager, compile"),
    (["bench", "train", "--variants", "eager", "--compile"], "--compile and --variants: give one"),
    (["bench", "mom", "--small", "--top-k", "0"], "--top-k must be at least 1 (got 0)"),
    (["bench", "decode", "--small", "--contexts", "64", "0"], "--contexts: every value must be at least 1 (got 64 0)"),
    (["bench", "decode", "--step-iters", "0"], "--step-iters must be at least 1 (got 0)"),
    (["bench", "decode", "--small", "--device", "tpu"], "--device: unknown device 'tpu'"),
    (["bench", "kernels", "--shapes", "8,4096,16"], "--shapes: expected B,T,H,D with four positive integers"),
    (["bench", "parallel", "--steps", "0"], "--steps must be at least 1 (got 0)"),
    (["bench", "parallel", "--nproc", "1"], "--nproc must be at least 2 (got 1)"),
    (["bench", "activations", "--seq", "0"], "--seq must be at least 1 (got 0)"),
    (["bench", "activations", "--device", "tpu"], "--device: 'tpu' is not cpu or cuda"),
])
def test_bad_flags_name_the_flag(args, words, capsys):
    assert words in cli_error(args, capsys)


@pytest.mark.parametrize("bench", [["train"], ["kernels"], ["decode", "--small", "--device", "cpu"], ["mom", "--small"],
                                   ["parallel"], ["activations", "--device", "cpu"]])
def test_bad_json_paths(bench, tmp_path, capsys):
    err = cli_error(["bench", *bench, "--json", str(tmp_path / "results.txt")], capsys)
    assert "must end in .json" in err
    err = cli_error(["bench", *bench, "--json", str(tmp_path / "no" / "results.json")], capsys)
    assert "does not exist" in err


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("args, words", [
    (["bench", "train"], ["lcsm bench train needs a CUDA GPU", "lcsm train"]),
    (["bench", "kernels", "--check-only"], ["lcsm bench kernels needs a CUDA GPU"]),
    (["bench", "decode"], ["lcsm bench decode at its default sizes needs a CUDA GPU", "--small"]),
    (["bench", "decode", "--small", "--device", "cuda"], ["--device cuda needs a CUDA GPU"]),
    (["bench", "mom"], ["needs a CUDA GPU", "use --small on the CPU"]),
])
def test_refused_cleanly_without_cuda(no_cuda, args, words, capsys):
    err = cli_error(args, capsys)
    for w in words:
        assert w in err


def test_bench_parallel_outside_torchrun(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "run under torchrun, or pass --nproc N" in cli_error(["bench", "parallel", "--small"], capsys)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "needs at least 2 processes" in cli_error(["bench", "parallel", "--small"], capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = cli_error(["bench", "parallel", "--longest-start", "99"], capsys)
    assert "--longest-start 99 must be a multiple of the number of processes (2)" in err


def test_profile_lists_every_tuned_config_with_its_time(monkeypatch):
    # `lcsm bench kernels --profile` ends with what each autotuned kernel chose and, from the
    # tuner's own timings, every configuration it tried, fastest first: the A/B of tiles in one run
    import triton

    from lcsm.bench import kernels as bench_kernels
    from lcsm.kernels.triton import scan

    class Tuned:  # what a triton.autotune object holds after tuning (timings: a float, or a list)
        def __init__(self, timings):
            self.cache = {("key",): min(timings, key=lambda c: timings[c] if isinstance(timings[c], float) else timings[c][0])}
            self.configs_timings = timings

    slow, fast = triton.Config({"BV": 64}, num_warps=8), triton.Config({"BV": 16}, num_warps=1)
    monkeypatch.setattr(scan, "fake_kernel", Tuned({slow: [2.5, 2.4, 2.6], fast: 0.75}), raising=False)
    lines = bench_kernels.tuned_configs().splitlines()
    at = next(n for n, line in enumerate(lines) if "tuned fake_kernel ('key',)" in line)
    assert "BV: 16" in lines[at]
    assert lines[at + 1].split()[:2] == ["0.7500", "ms"] and "BV: 16" in lines[at + 1]
    assert lines[at + 2].split()[:2] == ["2.5000", "ms"] and "BV: 64" in lines[at + 2]


def test_bench_activations_counts_what_grows_with_the_sequence(tmp_path, capsys):
    """Bytes kept per token on the CPU: positive, weights not counted (the same model at another
    batch keeps about the same per token: only tensors of one sequence's length, such as
    positions, are shared by the batch), the largest origins named."""
    import json

    from lcsm.cli.main import main

    def per_token(*extra):
        out = tmp_path / "a.json"
        assert main(["bench", "activations", "--models", "gla", "transformer", "--d-model", "32", "--heads", "2",
                     "--seq", "64", "--top", "3", "--device", "cpu", "--json", str(out), *extra]) == 0
        return {r["model"]: r for r in json.loads(out.read_text())["rows"]}

    one, two = per_token(), per_token("--batch", "2")
    for name in ("gla", "transformer"):
        assert one[name]["bytes_per_token"] > 0
        assert one[name]["bytes_per_token"] == pytest.approx(two[name]["bytes_per_token"], rel=0.05)
        assert one[name]["top"] and all(b > 0 for _, b in one[name]["top"])
    assert "bytes / token" in capsys.readouterr().out
