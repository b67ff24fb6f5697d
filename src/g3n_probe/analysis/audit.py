"""Faithfulness audit: where stock transformers and Google's reference Gemma 3n compute differently.

Compared on shared random weights, transformers 5.24 matches Google DeepMind's JAX implementation
(``gemma/gm/nn/gemma3n/``) to float32 rounding, but the code differs in three places real weights
can reach. `audit` finds each for a checkpoint and inputs:

1. **AltUp coefficient clipping.** The reference clips ``prediction_coefs`` and ``correction_coefs``
   to ±``altup_coef_clip`` on every forward; transformers clips only in training mode. Any stored
   coefficient beyond the clip changes activations from that layer on. ``g3n.load(...,
   altup_clip="reference")`` clips the weights once at load, which is what the per-forward clip
   amounts to in eval mode.
2. **Stream-magnitude epsilon.** Rescaling a projected stream to stream 0's RMS divides by
   ``sqrt(clamp(mean(x²), min=1e-5))`` in transformers and by ``max(sqrt(mean(x²)), 1e-12)`` in the
   reference: they differ for every token and stream whose projection has RMS below √1e-5 ≈ 3.2e-3
   (at the initial stack and at the final merge).
3. **Final soft cap.** The reference's E2B/E4B entry points set ``final_logit_softcap=None``;
   transformers applies ``final_logit_softcapping`` from the config (30). Argmax is unchanged,
   probabilities are not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..activations.batch import encode_inputs
from ..checkpoint import module_tree

if TYPE_CHECKING:
    from ..probe import Gemma3nProbe

EPSILON_SQUARED = 1e-5  # transformers' clamp on the mean square


@dataclass
class AuditReport:
    """What ``g3n.audit`` found: where this checkpoint computes differently under transformers than under
    Google's reference (AltUp coefficients beyond ``clip``, stream rescales below the epsilon on the given
    inputs, the final soft cap). ``verdict`` sums it up in one line; ``str(report)`` lists each finding."""

    clip: float | None
    coefficients_beyond_clip: list[dict] = field(default_factory=list)  # layer, matrix, index, value
    epsilon_hits: list[dict] = field(default_factory=list)  # where, prompt, token, stream, rms
    softcap: float | None = None
    prompts: int = 0

    @property
    def verdict(self) -> str:
        differences = []
        if self.coefficients_beyond_clip:
            layers = sorted({c["layer"] for c in self.coefficients_beyond_clip})
            differences.append(f"{len(self.coefficients_beyond_clip)} AltUp coefficient(s) beyond ±{self.clip:g} "
                               f"(layers {layers}; first differing layer {layers[0]})")
        if self.epsilon_hits:
            differences.append(f"{len(self.epsilon_hits)} token/stream rescale(s) below RMS {EPSILON_SQUARED ** 0.5:.2e} "
                               "in the given inputs")
        if self.softcap is not None:
            differences.append(f"final logits soft-capped at {self.softcap:g} (the reference applies none: "
                               "same argmax, different probabilities)")
        if not differences:
            return "this checkpoint computes identically under transformers and the reference"
        return "differs from the reference: " + "; ".join(differences)

    def __str__(self) -> str:
        lines = [f"verdict: {self.verdict}"]
        for c in self.coefficients_beyond_clip[:50]:
            lines.append(f"  layer {c['layer']} {c['matrix']}{list(c['index'])} = {c['value']:g}")
        for h in self.epsilon_hits[:50]:
            lines.append(f"  {h['where']}: prompt {h['prompt']} token {h['token']} stream {h['stream']} rms {h['rms']:.3e}")
        return "\n".join(lines)


def coefficients_beyond_clip(module: Any) -> list[dict]:
    text = module.config.get_text_config()
    clip = text.altup_coef_clip
    found: list[dict] = []
    if clip is None:
        return found
    for i, layer in enumerate(module_tree.text_model(module).layers):
        for matrix in ("prediction_coefs", "correction_coefs"):
            weight = getattr(layer.altup, matrix).weight.detach()
            for index in (weight.abs() > clip).nonzero().tolist():
                found.append({"layer": i, "matrix": matrix, "index": tuple(index), "value": float(weight[tuple(index)])})
    return found


def _mean_square(projected: torch.Tensor) -> torch.Tensor:
    """[B,T] mean square of a projected stream (what both implementations take the root of)."""
    return torch.mean(projected.float() ** 2, dim=-1)


def audit(model: Gemma3nProbe, inputs: str | Sequence[str] | torch.Tensor | None = None) -> AuditReport:
    """Audit a loaded probe (and, with ``inputs``, those prompts) against the reference's arithmetic."""
    module = model.hf_model
    text = module.config.get_text_config()
    report = AuditReport(clip=text.altup_coef_clip, coefficients_beyond_clip=coefficients_beyond_clip(module),
                         softcap=text.final_logit_softcapping)
    if inputs is None:
        return report
    prompts = [inputs] if isinstance(inputs, (str, torch.Tensor)) else list(inputs)
    language_model = module_tree.text_model(module)
    last = text.num_hidden_layers - 1
    for p, prompt in enumerate(prompts):
        ids = _ids(model, prompt)
        with torch.no_grad(), model.trace(ids):
            embed = model.embed.output.save()
            final = model.layers[last].output.save()
        with torch.no_grad():
            for stream in range(1, text.altup_num_inputs):
                for where, source, projections in (("initial stack", embed, language_model.altup_projections),
                                                   ("final merge", final[stream], language_model.altup_unembed_projections)):
                    mean_square = _mean_square(projections[stream - 1](source))
                    for b, t in (mean_square < EPSILON_SQUARED).nonzero().tolist():
                        report.epsilon_hits.append({"where": where, "prompt": p, "batch": b, "token": t, "stream": stream,
                                                    "rms": float(mean_square[b, t]) ** 0.5})
    report.prompts = len(prompts)
    return report


def _ids(model: Any, prompt: Any) -> torch.Tensor:
    ids = encode_inputs(model, prompt)[0]
    if ids.numel() == 0:
        raise ValueError("an audit prompt has no tokens")
    if not isinstance(prompt, torch.Tensor):
        specials = set(model.tokenizer.all_special_ids)
        if not any(int(t) not in specials for t in ids[0]):
            raise ValueError(f"prompt {prompt!r} tokenizes to nothing (only special tokens); give some text")
    return ids
