"""Features on Gemma 3n points: sparse autoencoders and transcoders, spliced into any point and trained
with EleutherAI's sparsify (the ``sae`` extra: ``pip install "g3n_probe[sae]"``).

    import g3n_probe as g3n
    trained = g3n.sae.train(model, texts, "layers.3.output", stream=1, k=16)     # sparsify, on the true rows
    with g3n.sae.spliced(model, "layers.3.output", trained.sae, stream=1) as s:  # every forward, generate too
        with model.trace(prompt):
            f = s.features.output.save()          # the latents: read, write (steer), .grad
            s.features.output[..., 7] *= 4
    print(g3n.sae.evaluate(model, texts, "layers.3.output", trained.sae, stream=1))

Inside a single trace, ``g3n.sae.splice(model.layers[3].mlp_out, sae)`` does the same for that forward.

Transcoders across every MLP (circuit-tracer's file layout in and out):

    tcs, stats = g3n.sae.train_transcoders(model, texts)            # all layers, one sparsify run
    tcs = g3n.sae.load_transcoders(g3n.sae.default_transcoders())   # the bundled default's, trained so
    with g3n.sae.replaced(model, tcs) as r:                         # every MLP replaced at once
        with model.trace(prompt):
            f = r.layers[3].features.output.save()
    print(g3n.sae.evaluate_replacement(model, texts, tcs))          # loss kept, per layer and all together

``<bos>`` follows one rule everywhere (`g3n_probe.sae.tokens`): ``include_bos=False`` by default, as training
does — its positions are not trained on, not spliced when measuring, and not counted.
"""

from pathlib import Path as _Path

from .evaluate import (
    Evaluation,
    MeanAblation,
    TopActivations,
    evaluate,
    top_activations,
)
from .replaced import Replacement, attach_transcoder, replaced
from .replacement_report import LayerReplacement, ReplacementReport, evaluate_replacement
from .splice import (
    Dense,
    FeaturePoint,
    Splice,
    attach,
    site_of,
    splice,
    splice_transcoder,
    spliced,
    spliced_transcoder,
)
from .tokens import token_mask
from .train import StreamTap, Trained, token_chunks, train
from .train_transcoders import TranscoderTap, TranscoderTraining, train_transcoders
from .transcoders import (
    Transcoder,
    TranscoderError,
    TranscoderSet,
    as_transcoder_set,
    from_sparsify,
    load_transcoders,
    save_transcoders,
)


def default_transcoders() -> _Path:
    """The directory of the bundled default's transcoders (all six MLPs, circuit-tracer's layout, → ``mlp_out``;
    made by ``scripts/train_transcoders.py``, measured in ``transcoders.json`` beside them):
    ``g3n.sae.load_transcoders(g3n.sae.default_transcoders())``."""
    path = _Path(__file__).resolve().parents[1] / "data" / "default" / "transcoders"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path}: the default's transcoders are not installed (scripts/train_transcoders.py "
                                "makes them)")
    return path


__all__ = [
    "Dense", "Evaluation", "FeaturePoint", "LayerReplacement", "MeanAblation", "Replacement", "ReplacementReport",
    "Splice", "StreamTap", "TopActivations", "Trained", "Transcoder", "TranscoderError", "TranscoderSet",
    "TranscoderTap", "TranscoderTraining", "as_transcoder_set", "attach", "attach_transcoder", "default_transcoders",
    "evaluate", "evaluate_replacement", "from_sparsify", "load_transcoders", "replaced", "save_transcoders",
    "site_of", "splice", "splice_transcoder", "spliced", "spliced_transcoder", "token_chunks", "token_mask",
    "top_activations", "train", "train_transcoders",
]
