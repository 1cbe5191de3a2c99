"""Recipes: every shipped YAML parses; models resolve from names, paths and mappings; --set overrides
are validated exactly like the file; errors name the field."""

import pytest
import yaml

from lcsm.config.recipe import Recipe, Task, load_recipe, shipped_recipes
from lcsm.config.spec import SpecError, load_yaml

TINY_MODEL = {"d_model": 16, "n_layers": 1, "mixer": {"kind": "eos", "oscillation": {"kind": "ones"}}}
TASK = {"kind": "mqar", "vocab_size": 64, "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 10}],
        "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 10}]}


def recipe(**fields) -> dict:
    return {"model": TINY_MODEL, "task": TASK, "steps": 5, **fields}


def error_of(data, overrides=()) -> str:
    with pytest.raises(SpecError) as info:  # RecipeError, or SpecError from a file
        load_recipe(data, list(overrides))
    msg = str(info.value)
    assert "Traceback" not in msg and "pydantic" not in msg.lower()
    return msg


@pytest.mark.parametrize("name", list(shipped_recipes("train")))
def test_every_shipped_training_recipe_is_valid(name):
    r = load_recipe(name)
    assert r.model.vocab_size == r.task.model_vocab_size
    assert r.name == name


@pytest.mark.parametrize("name", list(shipped_recipes("tasks")))
def test_every_shipped_task_is_valid(name):
    data, _ = load_yaml(shipped_recipes("tasks")[name])
    from pydantic import TypeAdapter

    TypeAdapter(Task).validate_python(data)
    load_recipe(recipe(task=name))  # and a recipe may name it


def test_no_argument_is_the_quick_start():
    r = load_recipe(None)
    assert r.name == "quickstart" and r.task.kind == "mqar" and r.model.mixer.kind == "eos"


def test_model_from_zoo_name_path_mapping_and_base(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(TINY_MODEL))
    for model in ("gla", str(spec), TINY_MODEL, {"base": "gla", "d_model": 32, "channel_mixer": {"kind": "none"}}):
        r = load_recipe(recipe(model=model), ["model.d_model=64"])
        assert r.model.d_model == 64
        assert r.model.vocab_size == 64, "the task sets the vocabulary"
    r = load_recipe(recipe(model={"base": "gla", "n_layers": 2, "channel_mixer": {"kind": "none"}}))
    assert r.model.n_layers == 2 and r.model.channel_mixer.kind == "none" and r.model.mixer.oscillation.kind == "vector_k"


def test_relative_paths_are_found_beside_the_recipe(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(TINY_MODEL))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(model="spec.yaml")))
    assert load_recipe(path).model.d_model == 16


def test_overrides_parse_yaml_values_and_reach_lists():
    r = load_recipe(
        recipe(),
        ["optimizer.lr=3e-4", "batch_size=8", "task.train.0.num_examples=20", "schedule={kind: constant}", "model=gla",
         "optimizer.betas=[0.9, 0.95]", "device=cpu"],
    )
    assert r.optimizer.lr == 3e-4 and r.batch_size == 8 and r.task.train[0].num_examples == 20
    assert r.schedule.kind == "constant" and r.model.name == "gla" and r.optimizer.betas == (0.9, 0.95)
    # the run length is steps or epochs: overriding one replaces the other
    assert load_recipe(recipe(), ["epochs=2"]).steps is None
    assert load_recipe("mqar_gla", ["steps=700"]).epochs is None


BAD_OVERRIDES = [
    (["optimizr.lr=1"], "optimizr: unknown key; did you mean 'optimizer'?"),
    (["optimizer.lr=-1"], "optimizer.lr: input should be greater than 0"),
    (["batch_size=many"], "batch_size: input should be a valid integer"),
    (["model.d_model=0"], "model.d_model: input should be greater than or equal to 1"),
    (["model.mixer.oscillation.kind=wave"], "model.mixer.oscillation: unknown kind 'wave'"),
    (["task.kind=chess"], "task: unknown kind 'chess'; allowed: mqar, selective_copying, induction, text"),
    (["task.train.3.seq_len=8"], "has no item 3"),
    (["task.train.0.seq_len=9"], "task.train.0: seq_len must be even"),
    (["device=tpu"], "device: unknown device 'tpu'; allowed: auto, cpu, cuda, cuda:N, mps"),
    (["batch_size"], "expected KEY.PATH=VALUE"),
    (["model.vocab_size=100"], "the task sets the vocabulary (64)"),
    (["epochs=2", "steps=3"], "steps: give exactly one of steps or epochs"),
    (["backend=magic"], "backend: 'magic' is not allowed; allowed: auto, triton, torch, reference"),
    # values that passed silently before: an infinite rate, a warmup longer than the run, integers torch cannot hold
    (["optimizer.lr=inf"], "optimizer.lr: input should be a finite number"),
    (["optimizer.lr=.nan"], "optimizer.lr: input should be a finite number"),
    (["schedule.warmup_steps=50"], "schedule.warmup_steps: 50 warmup steps exceed the run's 5 steps"),
    (["seed=100000000000000000000"], "seed: 100000000000000000000 is too large; integers must fit in 64 bits"),
    (["task.train.0.num_examples=99999999999999999999"], "task.train.0.num_examples: 99999999999999999999 is too large"),
    (["model.d_model=" + "9" * 40], "model.d_model: 999999999999...(40 digits) is too large"),
    # a name is a folder in runs/: it cannot leave it
    (["name=../escape"], "name: '../escape' holds a path separator"),
    (["name=.."], "name: '..' is not a folder name"),
    (["name=a\\b"], "holds a path separator"),
]


@pytest.mark.parametrize("overrides,words", BAD_OVERRIDES, ids=[o[0][0] for o in BAD_OVERRIDES])
def test_bad_overrides_name_the_field(overrides, words):
    assert words in error_of(recipe(), overrides)


def test_file_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: gla\ntask:\n  kind: mqar\n  vocab_size: 8192\nsteps: 10\noptimizer:\n  lr: 0\n")
    assert f"{path}:7: optimizer.lr: input should be greater than 0" in error_of(path)
    assert "no such file" in error_of(tmp_path / "missing.yaml")
    assert "not a shipped recipe" in error_of("no_such_recipe")
    assert "no such file, and not a zoo model" in error_of(recipe(model="no_such_model"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "a recipe is a mapping" in error_of(tmp_path / "list.yaml")


def test_resolved_recipe_round_trips():
    for name in ("quickstart", *[n for n in shipped_recipes("train") if "mamba" in n or "hgrn2" in n][:2]):
        r = load_recipe(name)
        again = load_recipe(yaml.safe_load(yaml.safe_dump(r.resolved())))
        assert again == r
        assert isinstance(again, Recipe)


def test_the_readme_training_example_is_a_valid_recipe():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("## Training", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    r = load_recipe(yaml.safe_load(block))
    assert r.model.d_model == 128 and r.task.kind == "mqar"


def test_the_recipe_names_the_kernel_backends():
    import typing

    from lcsm.config.recipe import Backend
    from lcsm.kernels import BACKENDS

    assert typing.get_args(Backend) == BACKENDS


def test_a_name_that_would_leave_runs_is_refused_and_out_dir_is_the_way_elsewhere(tmp_path):
    assert "name: '/tmp/x' holds a path separator" in error_of(recipe(name="/tmp/x"))
    r = load_recipe(recipe(name="../x", out_dir=str(tmp_path / "mine")))  # an explicit out_dir: the name is only a label
    assert r.run_dir == tmp_path / "mine"
    assert load_recipe(recipe(name="gla-128_v2.1")).run_dir.as_posix() == "runs/gla-128_v2.1"


def test_non_utf8_and_binary_files_name_the_file_and_the_byte(tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: café\nsteps: 5\n".encode("latin-1"))
    msg = error_of(latin)
    assert f"{latin}: not UTF-8 text: byte 0xe9 at offset 9 (line 1)" in msg
    noise = tmp_path / "noise.yaml"
    noise.write_bytes(bytes(range(128, 256)) * 4)
    assert f"{noise}: not UTF-8 text: byte 0x80 at offset 0" in error_of(noise)
    spec = tmp_path / "spec.yaml"  # a model file the recipe names: the error names that file
    spec.write_bytes(b"d_model: 16\nn_layers: 1\n# \xff\nmixer: {kind: eos, oscillation: {kind: ones}}\n")
    assert f"{spec}: not UTF-8 text: byte 0xff at offset 26 (line 3)" in error_of(recipe(model=str(spec)))


def test_lcsm_validate_checks_training_and_ablation_recipes_without_training(tmp_path, capsys):
    from helpers import cli_error  # tests/helpers.py

    from lcsm.cli.main import main
    from lcsm.config.paths import shipped

    paths = [str(p) for p in shipped_recipes("train").values()]  # lcsm validate lcsm/recipes/train/*.yaml
    assert main(["validate", *paths, "mqar_gla"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("training recipe:") == len(paths) + 1 and "did you mean" not in printed
    assert main(["validate", str(shipped("ablations")["lm_feature_maps"])]) == 0
    assert "ablation recipe: " in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe(optimizer={"lr": 0})))
    msg = cli_error(["validate", str(bad)], capsys)
    assert "optimizer.lr: input should be greater than 0" in msg and "d_model" not in msg
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "base": recipe(), "grid": {"model.d_model": [16, -4]}}))
    assert "point model.d_model=-4, seed=0" in cli_error(["validate", str(grid)], capsys)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ablations").exists()  # nothing was trained or written
