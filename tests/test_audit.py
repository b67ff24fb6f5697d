"""The faithfulness audit finds planted differences; altup_clip="reference" clips exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import g3n_probe as g3n
from g3n_probe.cli import main
from reference import build_stock, stock_forward

PLANTED_LAYER = 2


def _plant(tiny_dir, out, edits):
    shutil.copytree(tiny_dir, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    by_file = {}
    for key, fn in edits.items():
        by_file.setdefault(index[key], {})[key] = fn
    for filename, fns in by_file.items():
        tensors = load_file(str(out / filename))
        for key, fn in fns.items():
            tensors[key] = fn(tensors[key].clone())
        save_file(tensors, str(out / filename))
    return out


@pytest.fixture(scope="module")
def planted_dir(tiny_dir, tmp_path_factory):
    prefix = f"model.language_model.layers.{PLANTED_LAYER}.altup."

    def big_prediction(t):
        t[3, 1] = 300.0
        return t

    def big_correction(t):
        t[0, 2] = -150.0
        return t

    return _plant(tiny_dir, tmp_path_factory.mktemp("planted") / "c", {
        prefix + "prediction_coefs.weight": big_prediction,
        prefix + "correction_coefs.weight": big_correction,
        # Stream 2's initial projection shrunk so its RMS falls under √1e-5 for every token.
        "model.language_model.altup_projections.1.weight": lambda t: t * 1e-5,
    })


def test_audit_finds_planted_coefficients_and_epsilon(planted_dir, ids):
    model = g3n.load(planted_dir)
    report = g3n.audit(model, ids)
    found = {(c["layer"], c["matrix"], c["index"], c["value"]) for c in report.coefficients_beyond_clip}
    assert found == {(PLANTED_LAYER, "prediction_coefs", (3, 1), 300.0), (PLANTED_LAYER, "correction_coefs", (0, 2), -150.0)}
    initial = [h for h in report.epsilon_hits if h["where"] == "initial stack"]
    assert {h["stream"] for h in initial} == {2}
    assert sorted(h["token"] for h in initial) == list(range(ids.shape[1]))
    assert all(h["rms"] < 1e-5 ** 0.5 for h in initial)
    assert report.softcap == 30.0
    assert "AltUp coefficient" in report.verdict and "first differing layer 2" in report.verdict


def test_clean_checkpoint(probe, ids):
    report = g3n.audit(probe, ids)
    assert report.coefficients_beyond_clip == [] and report.epsilon_hits == []
    assert report.verdict.startswith("differs from the reference: final logits soft-capped at 30")
    report.softcap = None
    assert report.verdict == "this checkpoint computes identically under transformers and the reference"


def test_reference_clip_changes_activations_exactly_from_the_planted_layer(planted_dir, ids):
    stock_model = g3n.load(planted_dir)
    clipped = g3n.load(planted_dir, altup_clip="reference")
    assert clipped.load_report.clipped_coefficients == 2
    assert g3n.audit(clipped).coefficients_beyond_clip == []

    by_hand = build_stock(planted_dir)
    with torch.no_grad():
        for layer in by_hand.model.language_model.layers:
            for m in (layer.altup.prediction_coefs, layer.altup.correction_coefs):
                m.weight.clamp_(-120.0, 120.0)
    outputs = {}
    for name, model in (("stock", stock_model), ("clipped", clipped)):
        saved = []
        with model.trace(ids):
            for i in range(model.text_config.num_hidden_layers):
                saved.append(model.layers[i].output.save())
            logits = model.logits.output.save()
        outputs[name] = (saved, logits)
    for i in range(PLANTED_LAYER):
        assert torch.equal(outputs["stock"][0][i], outputs["clipped"][0][i]), i
    for i in range(PLANTED_LAYER, len(outputs["stock"][0])):
        assert not torch.equal(outputs["stock"][0][i], outputs["clipped"][0][i]), i
    assert torch.equal(outputs["clipped"][1], stock_forward(by_hand, ids).logits)


def test_bad_altup_clip_and_empty_prompt(tiny_dir, probe):
    with pytest.raises(ValueError, match="altup_clip"):
        g3n.load(tiny_dir, altup_clip="sometimes")
    with pytest.raises(ValueError, match="empty"):   # the input resolver refuses '' for every entry point
        g3n.audit(probe, "")
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        g3n.audit(probe, "<bos>")


def test_audit_cli(planted_dir, capsys):
    assert main(["audit", str(planted_dir), "--prompt", "def f(x):"]) == 0
    out = capsys.readouterr().out
    assert "prediction_coefs" in out and "stream-magnitude epsilon" in out and "verdict" in out


def test_audit_on_a_non_gemma3n_checkpoint(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["model_type"] = "gemma3"
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    assert main(["audit", str(tmp_path / "c")]) == 2
