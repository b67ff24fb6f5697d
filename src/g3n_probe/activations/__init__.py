"""Activations: one batch's point values, many texts' values on disk, and reading them back.

Inside the package, bottom up:

- `batch`: `ActivationCache`, the values of chosen points for one batch in one trace (`model.cache`).
- `writer`: `cache_dataset`, a point's values for many texts streamed into verified safetensors shards, with
  the run's identity (manifest, fingerprints) that a reader checks.
- `activation_dataset`: `ActivationDataset`, the rows of one point in such a directory, padding left out.
"""

from .activation_dataset import ActivationDataset
from .batch import ActivationCache
from .writer import cache_dataset

__all__ = ["ActivationCache", "ActivationDataset", "cache_dataset"]
