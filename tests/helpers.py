"""Helpers shared by test files (tests/ is on sys.path: pytest puts the folder of tests/conftest.py there)."""

import json

from lcsm.cli.main import main


def cli_error(args, capsys) -> str:
    """Run `lcsm ARGS`, expect exit code 2 with a message and no traceback; return stderr."""
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err
    return captured.err


def tiny(tmp_path, **fields) -> dict:
    """A model and an MQAR task small enough to train a dozen steps in a second."""
    return {
        "name": "tiny",
        "model": {
            "d_model": 16,
            "n_layers": 2,
            "n_heads": 2,
            "mixer": {"kind": "eos", "expand": {"conv": 2}, "oscillation": {"kind": "scalar", "source": "data"}},
            "channel_mixer": {"kind": "none"},
        },
        "task": {
            "kind": "mqar",
            "vocab_size": 64,
            "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 64}, {"seq_len": 32, "num_kv_pairs": 4, "num_examples": 32}],
            "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 32}, {"seq_len": 32, "num_kv_pairs": 4, "num_examples": 32}],
        },
        "optimizer": {"lr": 1e-2},
        "batch_size": 16,
        "steps": 12,
        "eval_every": 4,
        "log_every": 1,
        "out_dir": str(tmp_path / "run"),
        **fields,
    }


def train_losses(run_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "train"}
