"""Power-law fits (lcsm/run/fit.py), model statistics (modelstats.py) and per-slice reports
(slices.py) of ablations: the maths on synthetic data, the recipe fields, and tiny end-to-end grids."""

import csv
import math
import random

import pytest
import yaml

from lcsm.cli.main import main
from lcsm.config import ablation
from lcsm.config.recipe import RecipeError, load_recipe
from lcsm.run import ablate, report
from lcsm.run.fit import fit_power_law
from lcsm.run.modelstats import model_stats, run_stats


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))


def synthetic(b=-0.0768, a=3.54, noise=0.01, n=12, seed=0):
    rng = random.Random(seed)
    xs = [10 ** (10 + 4 * k / (n - 1)) for k in range(n)]  # four decades of compute
    return xs, [a * x**b * math.exp(rng.gauss(0, noise)) for x in xs]


def test_a_known_power_law_is_recovered_within_its_standard_error():
    xs, ys = synthetic(noise=0.0)
    law = fit_power_law(xs, ys)
    assert law.b == pytest.approx(-0.0768, abs=1e-12) and law.a == pytest.approx(3.54, rel=1e-9) and law.r2 == pytest.approx(1.0)
    xs, ys = synthetic(noise=0.01)
    law = fit_power_law(xs, ys)
    assert abs(law.b + 0.0768) < 3 * law.se_b and 0 < law.se_b < 0.005
    assert law.n == 12 and law(1e12) == pytest.approx(law.a * 1e12**law.b)
    # the standard error is calibrated: about 68% of fits land within one of the true exponent
    hits = 0
    for seed in range(300):
        law = fit_power_law(*synthetic(noise=0.02, n=6, seed=seed))
        hits += abs(law.b + 0.0768) < law.se_b
    assert 0.55 < hits / 300 < 0.8


def test_fit_needs_positive_values_and_two_distinct_x():
    assert math.isnan(fit_power_law([1e9, 1e10], [3.0, 2.5]).se_b)  # two points: exact, no error
    for xs, ys, words in [([1e9, -1.0], [1.0, 2.0], "positive"), ([1e9, 1e9, 1e9], [1.0, 2.0, 3.0], "two distinct"),
                          ([1e9], [1.0], "two distinct"), ([1.0, 2.0], [1.0], "length")]:
        with pytest.raises(ValueError, match=words):
            fit_power_law(xs, ys)


def text_grid(corpus, **fields) -> dict:
    """2 model kinds x 3 sizes, a few steps each on a tiny byte corpus."""
    grid = {
        "name": "tiny_scaling",
        "base": {
            "model": {"base": "tnl", "d_model": 8, "n_layers": 1, "n_heads": 1, "channel_mixer": {"kind": "none"}},
            "task": {"kind": "text", "corpus": str(corpus), "seq_len": 16, "val_fraction": 0.2},
            "batch_size": 4, "steps": 2, "log_every": 1, "threads": 1,
        },
        "grid": {
            "model": [{"label": "tnl", "set": {"model": {"base": "tnl", "n_layers": 1, "channel_mixer": {"kind": "none"}}}},
                      {"label": "transformer", "set": {"model": {"base": "transformer", "n_layers": 1, "channel_mixer": {"kind": "none"}}}}],
            "size": [{"label": "d8", "set": {"model.d_model": 8, "model.n_heads": 1, "steps": 2}},
                     {"label": "d16", "set": {"model.d_model": 16, "model.n_heads": 2, "steps": 3}},
                     {"label": "d32", "set": {"model.d_model": 32, "model.n_heads": 2, "steps": 4}}],
        },
        "fit": {"kind": "power_law", "x": "compute", "y": "loss", "by": "model", "reference": {"tnl": -0.0768}},
        "stats": ["non_embedding_parameters", "flops_per_token"],
    }
    grid.update(fields)
    return grid


def test_fit_fields_are_validated(tmp_path):
    corpus = tmp_path / "c.txt"
    for fields, words in [
        ({"fit": {"by": "modle"}}, "fit.by: 'modle' is not a grid axis"),
        ({"fit": {"y": "accuracyy"}}, "fit.y: 'accuracyy' is not a metric"),
        ({"fit": {"x": "flops"}}, "fit.x"),
        ({"fit": {"kind": "exponential"}}, "fit.kind"),
        ({"stats": ["state"]}, "stats"),
        ({"stats": ["flops_per_token", "flops_per_token"]}, "listed twice"),
        ({"slices": {}}, "slices.by"),
    ]:
        with pytest.raises(RecipeError, match=words):
            ablate.prepare(text_grid(corpus, **fields), tmp_path)
    with_lr = text_grid(corpus, best_of={"key": "optimizer.lr", "metric": "loss"})
    with_lr["grid"]["optimizer.lr"] = [1e-3]
    with_lr["fit"]["by"] = "optimizer.lr"
    with pytest.raises(RecipeError, match="best_of axis"):
        ablate.prepare(with_lr, tmp_path)
    path = tmp_path / "grid.yaml"
    bad = text_grid(corpus)
    bad["fit"]["reference"] = {"tnl": -0.07, "llama": -0.08}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(RecipeError, match="fit.reference: llama not among the values of model"):
        ablate.prepare(path, tmp_path)
    # a reference for a model that --grid leaves out is not an error
    path.write_text(yaml.safe_dump(text_grid(corpus)))
    assert len(ablate.prepare(path, tmp_path, axes=["model=[transformer]"]).points) == 3


def test_model_stats_count_what_lcsm_show_counts():
    r = load_recipe({"model": {"base": "gla", "d_model": 64, "n_layers": 2, "channel_mixer": {"kind": "none"}},
                     "task": "mqar_small", "steps": 10, "batch_size": 8}).resolved()
    s = model_stats(r)
    assert s["context"] == 128 and not s["state_grows"]  # mqar_small trains at 64 and 128
    assert s["parameters"] - s["non_embedding_parameters"] == 8192 * 64 + 64  # the (tied) embedding and head, the final norm
    assert s["active_parameters"] == s["non_embedding_parameters"]
    assert s["state_size"] == 2 * 4 * 8 * 16  # 2 layers x 4 heads x K 8 x V 16
    mom = model_stats(load_recipe({"model": {"base": "mom_gla", "d_model": 64, "n_layers": 2, "channel_mixer": {"kind": "none"}},
                                   "task": "mqar_small", "steps": 10}).resolved())
    # a token uses 3 of the 5 memories' key and value projections: 2 of 5 idle
    per_memory = 2 * (64 * 32 + 64 * 64)  # two layers of a d->K key and a d->V value projection
    assert mom["non_embedding_parameters"] - mom["active_parameters"] == 2 * per_memory
    assert mom["state_size"] == 5 * s["state_size"]
    attn = model_stats(load_recipe({"model": {"base": "transformer", "d_model": 64, "n_layers": 2}, "task": "mqar_small",
                                    "steps": 10}).resolved())
    assert attn["state_grows"] and attn["state_size"] == 2 * 2 * 64 * 128  # K and V of 2 layers at 128 tokens
    run = run_stats(r, 10)
    mean_len = (64 * 20000 + 128 * 10000) / 30000  # the example-weighted length of the mixture
    assert run["tokens"] == pytest.approx(10 * 8 * mean_len) and run["compute"] == pytest.approx(3 * s["flops_per_token"] * run["tokens"])


def test_a_tiny_scaling_grid_reports_the_fit_and_its_plot(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog; " * 60)
    ab = ablate.prepare(text_grid(corpus), tmp_path / "out")
    counts = ablate.run([ab])
    assert counts["done"] == 6 and counts["failed"] == 0
    folder = tmp_path / "out" / "tiny_scaling"
    assert main(["ablate", "--report", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "Fit: loss = a · compute^b per model" in printed
    md = (folder / "results.md").read_text()
    assert "## Fit: loss = a · compute^b per model" in md and "## Models" in md
    fit_rows = [line for line in md.splitlines() if line.startswith("| tnl |") and "-0.0768" in line]
    assert len(fit_rows) == 1 and fit_rows[0].count("|") == 11  # with the reference b and (b - ref)/se
    assert (folder / "fit.png").stat().st_size > 1000
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["compute"]) > 0 and float(r["tokens"]) > 0 for r in rows)
    by_size = {(r["model"], r["size"]): float(r["compute"]) for r in rows}
    assert by_size[("tnl", "d8")] < by_size[("tnl", "d16")] < by_size[("tnl", "d32")]
    # the fit reads the points back: three per kind
    grid, got = report.collect(folder)
    report.add_stats(folder, got)
    from lcsm.run.fit import fits

    results = fits(grid, got, report.summarise(grid, got))
    assert [(g.label, len(g.points)) for g in results] == [("tnl", 3), ("transformer", 3)]
    assert all(g.law is not None for g in results)


def test_slices_report_the_metric_per_test_slice_with_the_state_size(tmp_path):
    base = {
        "model": {"d_model": 16, "n_layers": 1, "mixer": {"kind": "eos", "expand": {"conv": 2}, "oscillation": {"kind": "scalar", "source": "data"}},
                  "channel_mixer": {"kind": "none"}},
        "task": {"kind": "mqar", "vocab_size": 32,
                 "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 32}, {"seq_len": 16, "num_kv_pairs": 4, "num_examples": 32}],
                 "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 8}, {"seq_len": 16, "num_kv_pairs": 4, "num_examples": 8}]},
        "batch_size": 8, "steps": 2, "log_every": 1, "threads": 1,
    }
    grid = {"name": "tiny_slices", "base": base,
            "grid": {"model.d_model": [8, 16], "optimizer.lr": [1e-2, 3e-2]},
            "best_of": {"key": "optimizer.lr", "metric": "accuracy"}, "seeds": [0, 1],
            "stats": ["parameters", "state_size"], "slices": {"by": "num_kv_pairs"}}
    ab = ablate.prepare(grid, tmp_path)
    assert ablate.run([ab])["done"] == 8
    rep = report.build_report(ab.out_dir)
    md = rep["md"].read_text()
    assert "## accuracy per num_kv_pairs" in md
    head = next(line for line in md.splitlines() if "num_kv_pairs=2" in line)
    assert head.split("|")[1:-1] == [" model.d_model ", " best lr ", " params ", " state ", " num_kv_pairs=2 ", " num_kv_pairs=4 ", " seeds "]
    section = md.split("## accuracy per num_kv_pairs")[1]
    row = next(line for line in section.splitlines() if line.startswith("| 8 |"))
    assert row.count("±") == 2  # two seeds: mean ± std per slice
    assert [p.name for p in rep["extra_png"]] == ["accuracy_by_num_kv_pairs.png"] and rep["extra_png"][0].stat().st_size > 1000


@pytest.mark.parametrize("name", ["scaling", "mom_recall"])
def test_the_study_recipes_parse(name, tmp_path, capsys):
    grid, _ = ablation.load_grid(name)
    if name == "scaling":
        for extra in ([], ["--reduced"]):
            assert main(["ablate", name, *extra, "--dry-run", "--out", str(tmp_path)]) == 0
        assert "20 points, every one a valid recipe" in capsys.readouterr().out
        full = ablate.prepare(name, tmp_path)
        reduced = ablate.prepare(name, tmp_path, reduced=True)
        assert len(full.points) == 4 * 5 * 3 * 2 and len(reduced.points) == 4 * 5
        assert grid.fit.by == "model" and grid.fit.x == "compute" and set(grid.fit.reference) == {"tnl", "hgrn2", "cosformer", "transformer"}
        for p in reduced.points:  # tokens scaled with parameters: 15-25 bytes per non-embedding parameter
            s = run_stats(p.recipe, p.recipe["steps"])
            assert 15 < s["tokens"] / s["non_embedding_parameters"] < 25 and p.recipe["task"]["tokenizer"]["kind"] == "byte"
            assert p.recipe["steps"] >= 128 and p.recipe["eval_every"] == p.recipe["steps"]
    else:
        from lcsm.config.paths import zoo_paths

        # the gated-delta variants need the delta-rule oscillation: check those this tree has
        labels = [v["label"] for v in grid.grid["model"]]
        known = [label for label, v in zip(labels, grid.grid["model"]) if v["set"]["model"]["base"] in zoo_paths()]
        assert {"mom_gla", "gla", "gla_active", "transformer"} <= set(known)
        for extra in ([], ["--reduced"]):
            assert main(["ablate", name, *extra, "--grid", f"model=[{','.join(known)}]", "--dry-run", "--out", str(tmp_path)]) == 0
        assert f"{len(known) * 3 * 2} points, every one a valid recipe" in capsys.readouterr().out
        for reduced in (False, True):
            ab = ablate.prepare(name, tmp_path, reduced=reduced, axes=[f"model=[{','.join(known)}]"])
            assert len(ab.points) == len(known) * (2 * 3 * 3 if not reduced else 3 * 2)
            for p in ab.points:
                assert p.recipe["model"]["n_layers"] == 2 and p.recipe["model"]["channel_mixer"] == {"kind": "none"}
                assert [s["num_kv_pairs"] for s in p.recipe["task"]["test"]] == [16, 32, 64]
        # equal active parameters: within 3% of MoM's
        stats = {p.labels["model"]: model_stats(p.recipe) for p in ab.points}
        assert abs(stats["gla_active"]["active_parameters"] / stats["mom_gla"]["active_parameters"] - 1) < 0.03
        if "mom_gated_deltanet" in known and "gated_deltanet_active" in known:
            assert abs(stats["gated_deltanet_active"]["active_parameters"] / stats["mom_gated_deltanet"]["active_parameters"] - 1) < 0.03
