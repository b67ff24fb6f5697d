"""The nnsight model: `Gemma3nProbe` with its envoys, the exact logit lens and TransformerLens conventions.

Inside the package, bottom up:

- `tl`: TransformerLens conventions (``to_tokens``, ``test_prompt``, ``W_E``, ``W_U`` …) on the stock tokenizer
  and weights.
- `lens`: the exact Gemma 3n readout through the AltUp merge, usable on any layer's stack.
- `gemma3n_probe`: `Gemma3nProbe`, nnsight's language model over a point-injected stock model (envoys for
  the points, ``model.layers[i]``, ``lens``, ``cache``).
"""

from .gemma3n_probe import Gemma3nProbe

__all__ = ["Gemma3nProbe"]
