"""The bundled default: a small Gemma 3n trained on the standard library, loaded by g3n.load()."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import g3n_probe as g3n
from g3n_probe.loading import BUNDLED

pytestmark = pytest.mark.skipif(not (BUNDLED / "model.safetensors").exists(), reason="no bundled checkpoint in this build")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default():
    return g3n.load()


def test_default_is_the_bundled_checkpoint(default):
    assert default.load_report.source == BUNDLED
    text = default.text_config
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    assert "store" in text.kv_sharing_modes and "reuse" in text.kv_sharing_modes
    assert text.altup_num_inputs == 4 and text.num_hidden_layers >= 6
    assert any(s > 0 for s in text.activation_sparsity_pattern)
    assert default.load_report.tower_tensors_in_checkpoint == {"vision": 0, "audio": 0}
    with pytest.raises(g3n.TowerNotLoadedError, match="no audio tower"):
        default.load_tower("audio")
    tok = default.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")] == [0, 1, 2, 105, 106]


def test_model_card_reports_learning():
    card = json.loads((BUNDLED / "training.json").read_text())
    assert card["held_out_loss"] <= 0.5 * card["uniform_loss"]
    assert card["copy_second_loss"] < 0.5 * card["copy_first_loss"]
    assert (BUNDLED / "README.md").exists()


def test_copying_measured_again(default):
    """Recompute the card's in-context copying figure on the shipped weights."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train_default import copying
    finally:
        sys.path.pop(0)
    try:
        first, second = copying(default.hf_model)
    finally:
        default.hf_model.eval()   # copying() leaves the model in training mode, as the training script wants it
    card = json.loads((BUNDLED / "training.json").read_text())
    # Training measured in float32; the shipped weights are bfloat16, so allow a little drift.
    assert math.isclose(first, card["copy_first_loss"], rel_tol=0.05)
    assert math.isclose(second, card["copy_second_loss"], rel_tol=0.1, abs_tol=0.1)
    assert second < 0.5 * first


def test_it_predicts_python(default):
    with torch.no_grad(), default.trace("import os\nimport sys\n\n\ndef main():\n    return 0\n\n\nif __name__ == '__main__':\n    main"):
        logits = default.logits.output.save()
    assert default.tokenizer.decode([int(logits[0, -1].argmax())]).startswith("(")
