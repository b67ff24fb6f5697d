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
"""

from .evaluate import (
    Evaluation,
    MeanAblation,
    TopActivations,
    evaluate,
    top_activations,
)
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
from .train import StreamTap, Trained, token_chunks, train

__all__ = [
    "Dense", "Evaluation", "FeaturePoint", "MeanAblation", "Splice", "StreamTap", "TopActivations", "Trained",
    "attach", "evaluate", "site_of", "splice", "splice_transcoder", "spliced", "spliced_transcoder",
    "token_chunks", "top_activations", "train",
]
