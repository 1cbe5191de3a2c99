"""Hugging Face: `lcsm export RUN --hf DIR` and AutoModelForCausalLM.from_pretrained(DIR) give the
run's logits and, through generate() on lcsm's recurrent cache, the greedy tokens of `lcsm
generate`; `import lcsm` registers with transformers without importing it."""

import subprocess
import sys

import pytest
import torch
import yaml

from lcsm.cli.main import main
from lcsm.config.spec import load_model_spec
from lcsm.run.evaluate import load_run

from helpers import cli_error, tiny

transformers = pytest.importorskip("transformers")  # the test extra installs it
import lcsm.hf as hf  # noqa: E402  (registers)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))


def trained(tmp_path, model, task, name="run"):
    recipe = tiny(tmp_path, model=model, task=task, steps=3, eval_every=3, out_dir=str(tmp_path / name), threads=1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    return tmp_path / name


def lcsm_greedy(run, prompt: str, n: int, capsys) -> list[int]:
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", prompt, "--greedy", "--max-tokens", str(n), "--ids", "--quiet-prompt", "--device", "cpu"]) == 0
    return [int(t) for t in capsys.readouterr().out.split()]


SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "channel_mixer": {"kind": "glu"}}


@pytest.mark.parametrize("base", ["mamba2", "hybrid_gla", "cosformer"])
def test_export_then_from_pretrained_gives_the_same_logits_and_greedy_tokens(tmp_path, capsys, base):
    spec = {"base": base, **SMALL}
    if base == "hybrid_gla":
        spec.update(n_layers=2, pattern="mixer attn")
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat; the dog lay on the log. " * 60)
    run = trained(tmp_path, spec, {"kind": "text", "corpus": str(corpus), "seq_len": 32, "val_fraction": 0.1})
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(model, hf.LcsmForCausalLM)
    prompt = "the cat sat"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == list(prompt.encode())  # the bytes tokenizer as a tokenizers file
    _, ref, _, _ = load_run(run)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref.eval()(ids), rtol=0, atol=0)
    new = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert new == lcsm_greedy(run, prompt, 12, capsys)
    assert tok.decode(new) == bytes(new).decode("utf-8", errors="replace")


def test_generate_decodes_one_token_at_a_time_from_the_recurrent_cache(tmp_path, monkeypatch):
    spec = load_model_spec("gla").model_dump(mode="json", exclude_unset=True) | {"d_model": 32, "n_layers": 2, "vocab_size": 40}
    model = hf.LcsmForCausalLM(hf.LcsmConfig(spec=spec)).eval()
    lengths = []
    real = model.model.forward

    def spy(tokens, *args, cache=None, **kwargs):
        lengths.append((tokens.shape[1], cache is not None))
        return real(tokens, *args, cache=cache, **kwargs)

    monkeypatch.setattr(model.model, "forward", spy)
    prompt = torch.randint(0, 40, (2, 7))
    out = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert lengths == [(7, True)] + [(1, True)] * 4  # a prefill, then one token per step
    monkeypatch.undo()
    assert torch.equal(out[:, 7:], model.model.generate(prompt, 5, temperature=0))
    # sampling, with a seed, runs through the same path
    torch.manual_seed(0)
    assert model.generate(prompt, max_new_tokens=3, do_sample=True, top_k=5).shape == (2, 10)
    with pytest.raises(ValueError, match="unpadded"):
        model(prompt, attention_mask=torch.tensor([[0] + [1] * 6, [1] * 7]))
    # the loss follows transformers' convention (labels are the inputs, shifted inside)
    loss = model(prompt, labels=prompt).loss
    logits = model(prompt).logits
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), prompt[:, 1:].reshape(-1)))


def test_a_corpus_run_exports_its_tokenizer_with_its_eos(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i}.txt").write_text(f"document {i}: the cat sat on the mat. " * 3)
    assert main(["data", "prepare", str(folder), "--out", str(tmp_path / "c"), "--tokenizer", "bpe:300", "--val-fraction", "0.2", "--quiet"]) == 0
    task = {"kind": "corpus", "path": str(tmp_path / "c"), "seq_len": 16, "eval_windows": 2}
    run = trained(tmp_path, {"base": "gla", **SMALL}, task)
    assert main(["export", str(run), "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "w.safetensors")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    run_tok = load_run(run)[0].task.load_tokenizer(run)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == run_tok.eos_id == model.config.eos_token_id
    assert tok("the cat sat")["input_ids"] == run_tok.encode("the cat sat")
    ids = tok("the cat", return_tensors="pt")["input_ids"]
    new = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert new == lcsm_greedy(run, "the cat", 6, capsys)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "w.safetensors")) <= set(load_run(run)[1].state_dict())
    assert "exists and is not an empty folder" in cli_error(["export", str(run), "--hf", str(tmp_path / "hf")], capsys)
    assert "give what to write" in cli_error(["export", str(run)], capsys)


def test_import_lcsm_registers_with_transformers_without_importing_it(tmp_path):
    spec = load_model_spec("mamba2").model_dump(mode="json", exclude_unset=True) | {"d_model": 32, "n_layers": 2, "vocab_size": 40}
    hf.LcsmForCausalLM(hf.LcsmConfig(spec=spec)).save_pretrained(tmp_path / "m")
    code = (
        "import sys, lcsm; assert 'transformers' not in sys.modules;"
        "from transformers import AutoModelForCausalLM as A;"
        f"print(type(A.from_pretrained({str(tmp_path / 'm')!r})).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "LcsmForCausalLM"
