"""Every zoo model's logits at a fixed seed equal the ones saved in tests/nn/data/zoo_logits.pt.

The file was written before the redesign that moved the code into lcsm/config, lcsm/nn, lcsm/run
(...), so this test is the proof that the move changed no model. A deliberate change of outputs
rewrites an entry, with the reason in the commit: run this file with LCSM_WRITE_ZOO_LOGITS=1 to
add the zoo models the file lacks (new specs); to rewrite one, delete its entry first.

Deliberate differences to the saved logits, each checked below:
- hgrn2: its input is now a plain linear projection, as in the authors' language-model code and
  fla (it was SiLU(W_i x)); with the SiLU put back, the saved logits are reproduced exactly.
"""

import os
from pathlib import Path

import pytest
import torch

from lcsm.config.paths import zoo_names
from lcsm.config.spec import load_model_spec
from lcsm.nn.model import Model

SAVED = Path(__file__).parent / "data" / "zoo_logits.pt"
CHANGED = {"hgrn2": {"input": {"feature_map": "silu"}}}  # name -> the mixer fields that give the saved logits


def logits(spec) -> torch.Tensor:
    spec = spec.model_copy(update={"vocab_size": 64})
    torch.manual_seed(0)
    model = Model(spec).double().eval()
    tokens = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(tokens).float()


def saved() -> dict:
    data = torch.load(SAVED, weights_only=True)
    missing = [n for n in zoo_names() if n not in data]
    if missing and os.environ.get("LCSM_WRITE_ZOO_LOGITS") == "1":
        data.update({n: logits(load_model_spec(n)) for n in missing})
        torch.save(data, SAVED)
    return data


@pytest.mark.parametrize("name", zoo_names())
def test_zoo_logits_are_unchanged(name):
    data = saved()
    assert name in data, f"{name} has no saved logits: run this test with LCSM_WRITE_ZOO_LOGITS=1 once (see the docstring)"
    spec = load_model_spec(name)
    if name in CHANGED:
        mixer = spec.mixer.model_dump(exclude_unset=True)
        for key, value in CHANGED[name].items():
            mixer[key] = value
        spec = spec.model_copy(update={"mixer": type(spec.mixer).model_validate(mixer)})
    torch.testing.assert_close(logits(spec), data[name], rtol=0, atol=0)
