"""lm-evaluation-harness: the lcsm model class's three request kinds against plain forward passes,
and `lcsm eval RUN --lm-eval TASKS` on local tasks (JSON data files, as lm-eval reads them offline)
of every output type, into RUN/eval/lm_eval.json (the eval schema, beside the training's eval.json);
an unknown task is a clear error."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from lcsm.cli.main import main
from lcsm.run import files
from lcsm.run.evaluate import load_run, read_eval

from helpers import cli_error, tiny

pytest.importorskip("lm_eval")  # the test extra installs it
from lcsm.run.harness import LcsmLM  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _offline(tmp_path_factory):
    # nothing from the hub: lm-eval reads the local data files through datasets' json builder
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCSM_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_task_index_per_folders():
    """lm-eval's TaskManager indexes its thousands of built-in task YAMLs when it is made (about
    12 s each time on the CI machine). lcsm makes one per set of folders and process
    (harness.task_manager); the file's tests that build their own share one the same way."""
    import lm_eval.tasks

    real, made = lm_eval.tasks.TaskManager, {}

    def shared(verbosity=None, include_path=None, include_defaults=True, **rest):
        paths = include_path if isinstance(include_path, (list, tuple)) else [include_path] if include_path else []
        key = (tuple(str(p) for p in paths), include_defaults, repr(sorted(rest.items())))
        if key not in made:
            made[key] = real(include_path=include_path, include_defaults=include_defaults, **rest)
        return made[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval.tasks, "TaskManager", shared)
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small trained text run (bytes) for the file's tests: a hybrid, so attention's KV cache
    is exercised beside the recurrent state."""
    tmp_path = tmp_path_factory.mktemp("lm_eval_run")
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log. " * 80)
    model = {"base": "hybrid_gla", "d_model": 32, "n_layers": 2, "n_heads": 2, "pattern": "mixer attn"}
    recipe = tiny(tmp_path, model=model, task={"kind": "text", "corpus": str(corpus), "seq_len": 32, "val_fraction": 0.1},
                  steps=30, eval_every=30, optimizer={"lr": 3e-3}, threads=1)
    recipe["out_dir"] = str(tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    return tmp_path / "run"


def request(*args):
    return SimpleNamespace(args=args)


def test_the_model_class_agrees_with_plain_forward_passes(run):
    recipe, model, run_dir, _ = load_run(run)
    tok = recipe.task.load_tokenizer(run_dir)
    lm = LcsmLM(model, tok, batch_size=2, max_length=7)  # small pieces: the cache carries the rest
    model.eval()

    def logprobs(ids):
        with torch.no_grad():
            return F.log_softmax(model(torch.tensor([ids])).float(), -1)[0]

    newline = tok.encode("\n")
    cases = [("the cat sat on the", " mat."), ("the cat sat on the", " log."), ("the cat sat on the ", "dog"), ("the dog", " sat")]
    got = lm.loglikelihood([request(c, x) for c, x in cases])
    for (ctx, cont), (score, greedy) in zip(cases, got):
        ctx = ctx.rstrip() if ctx.endswith(" ") else ctx
        cont = (" " if cont == "dog" else "") + cont
        ids = newline + tok.encode(ctx) + tok.encode(cont)
        lp = logprobs(ids)
        n = len(tok.encode(cont))
        targets = torch.tensor(ids[-n:])
        expected = lp[-n - 1 : -1].gather(-1, targets[:, None]).sum().item()
        assert score == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((lp[-n - 1 : -1].argmax(-1) == targets).all())

    text = "the cat sat on the mat. the dog sat on the log."
    (rolling,) = lm.loglikelihood_rolling([request(text)])
    ids = newline + tok.encode(text)
    lp = logprobs(ids)
    assert rolling == pytest.approx(lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum().item(), abs=1e-4)

    (generated,) = lm.generate_until([request("the cat", {"until": ["."], "max_gen_toks": 12})])
    ids = model.generate(newline + tok.encode("the cat"), 12, temperature=0)
    assert generated == tok.decode(ids).split(".")[0]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> str:
    """The local tasks, one folder for the file (so its tests share one task index)."""
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


def write_tasks(tmp_path) -> str:
    folder = tmp_path / "tasks"
    folder.mkdir()
    choice = [{"question": "the cat sat on the", "choices": [" mat.", " cat.", " sat."], "answer": 0},
              {"question": "the dog sat on the", "choices": [" log.", " the."], "answer": 0},
              {"question": "the cat", "choices": [" sat", " dog"], "answer": 0}]
    (folder / "choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in choice))
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the cat sat on the mat.", "the dog sat."]))
    (folder / "gen.jsonl").write_text(json.dumps({"prompt": "the cat sat on the", "answer": " mat"}) + "\n")

    def task(name, data, **fields):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / data)}},
            "test_split": "test", **fields}))

    task("lcsm_toy_choice", "choice.jsonl", output_type="multiple_choice", doc_to_text="{{question}}",
         doc_to_choice="{{choices}}", doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}])
    task("lcsm_toy_rolling", "texts.jsonl", output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
         metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}])
    task("lcsm_toy_gen", "gen.jsonl", output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{answer}}",
         generation_kwargs={"until": ["."], "max_gen_toks": 6}, metric_list=[{"metric": "exact_match"}])
    return str(folder)


def test_lcsm_eval_lm_eval_runs_local_tasks_beside_eval_json(run, tasks, tmp_path, capsys):
    before = (run / "eval.json").read_bytes()
    names = ["lcsm_toy_choice", "lcsm_toy_rolling", "lcsm_toy_gen"]
    assert main(["eval", str(run), "--lm-eval", ",".join(names), "--lm-eval-include", tasks,
                 "--limit", "2", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "lcsm_toy_choice" in printed and "acc" in printed and "bits_per_byte" in printed
    assert (run / "eval.json").read_bytes() == before  # the run's own evaluation is not touched
    path = run / "eval" / "lm_eval.json"
    raw = json.loads(path.read_text())
    assert raw["format"] == "lcsm-eval/1" and raw["written_by"] == "lcsm eval --lm-eval" and raw["run"] == str(run)
    assert "eval/lm_eval.json" in files.owned(run)  # lcsm's file: --overwrite removes it, nothing else writes over it
    report = read_eval(path)  # the one reader of eval files
    assert report.step == read_eval(run / "eval.json").step
    assert report.task["kind"] == "lm_eval" and report.task["tasks"] == names and report.task["limit"] == 2
    assert report.task["include"] == [tasks] and report.task["n_samples"]["lcsm_toy_choice"]["effective"] == 2
    results = report.metrics
    assert 0 <= results["lcsm_toy_choice"]["acc,none"] <= 1
    assert results["lcsm_toy_rolling"]["bits_per_byte,none"] > 0
    assert "exact_match,none" in results["lcsm_toy_gen"]

    # -o FILE.json: the same record elsewhere
    other = tmp_path / "lm.json"
    assert main(["eval", str(run), "--lm-eval", "lcsm_toy_choice", "--lm-eval-include", tasks, "--limit", "1",
                 "-o", str(other)]) == 0
    assert read_eval(other).task["tasks"] == ["lcsm_toy_choice"] and read_eval(path).task["tasks"] == names


def test_lm_evals_own_api_takes_a_run_by_its_path(run, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model="lcsm", model_args=f"run={run},batch_size=4", tasks=["lcsm_toy_choice"], limit=2,
                                      task_manager=TaskManager(include_path=tasks), bootstrap_iters=0)
    assert 0 <= results["results"]["lcsm_toy_choice"]["acc,none"] <= 1


def test_an_unknown_lm_eval_task_is_a_clear_error(run, tmp_path, capsys):
    err = cli_error(["eval", str(run), "--lm-eval", "no_such_task_xyz"], capsys)
    assert "unknown task(s) no_such_task_xyz" in err
    assert "--lm-eval-include" in cli_error(["eval", str(run), "--limit", "3"], capsys)
    assert "no such folder" in cli_error(["eval", str(run), "--lm-eval", "x", "--lm-eval-include", str(tmp_path / "nope")], capsys)


def test_one_task_manager_per_folders(monkeypatch):
    import lm_eval.tasks

    from lcsm.run import harness

    made = []
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_path=None: made.append(include_path) or object())
    harness.task_manager.cache_clear()
    try:
        first = harness.task_manager(("a",))
        assert harness.task_manager(("a",)) is first and harness.task_manager(()) is not first
        assert made == [["a"], None]
    finally:
        harness.task_manager.cache_clear()
