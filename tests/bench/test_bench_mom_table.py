"""`lcsm bench mom --table`: the MQAR comparison of finished runs, on the CPU, from a tiny run
trained here (routed memories, so the table's memories column and the aux loss are filled)."""

import json

import pytest
from helpers import cli_error  # tests/ is on sys.path (tests/conftest.py's folder)

from lcsm.cli.main import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lcsm.config.recipe import load_recipe
    from lcsm.run.trainer import train

    out = tmp_path_factory.mktemp("mom_table")
    recipe = load_recipe({
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "channel_mixer": {"kind": "none"},
                  "mixer": {"kind": "eos", "oscillation": {"kind": "vector_k"}, "routing": {"memories": 3, "top_k": 2}}},
        "task": {"kind": "mqar", "vocab_size": 32, "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 32}],
                 "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 8}]},
        "batch_size": 16, "steps": 2, "log_every": 1, "device": "cpu", "out_dir": str(out / "run"),
    })
    train(recipe, quiet=True)
    return out / "run"


def test_table_of_a_finished_run(tiny_run, tmp_path, capsys):
    path = tmp_path / "table.json"
    assert main(["bench", "mom", "--table", str(tiny_run), "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| run | model | memories | d_model | params (M) | steps | test accuracy |")
    assert f"| {tiny_run.name} |" in out and "| 3, top-2 + shared |" in out
    (row,) = json.loads(path.read_text())["runs"]
    assert row["memories"] == "3, top-2 + shared" and row["steps"] == 2 and 0 <= row["accuracy"] <= 1
    assert row["d_model"] == 16 and row["params_M"] > 0 and row["final_aux_loss"] is not None


def test_table_refuses_what_is_not_a_finished_run(tiny_run, tmp_path, capsys):
    assert "not a finished run" in cli_error(["bench", "mom", "--table", str(tmp_path / "missing")], capsys)
    half = tmp_path / "half"
    half.mkdir()
    (half / "eval.json").write_text("{}")
    (half / "metrics.jsonl").write_text("")
    (half / "config.yaml").write_text("model: {d_model: 16}\n")
    assert "not a finished MQAR run" in cli_error(["bench", "mom", "--table", str(half)], capsys)
    assert "must end in .json" in cli_error(["bench", "mom", "--table", str(tiny_run), "--json", str(tmp_path / "t")], capsys)
