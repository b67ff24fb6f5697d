"""From a hub id to a local text-only checkpoint: only the bytes the text path reads (`g3n.hub.fetch`).

Inside the package, bottom up:

- `http`: the few requests a fetch makes, through huggingface_hub, with its errors made plain.
- `cache_layout`: the fetch's cache on disk (where things are, no link followed, bytes checked by content).
- `transfers`: one file of a fetch made complete and checked (ranged reads, journals, resumption).
- `fetching`: `fetch`, `locate`, `verify`, `cached_checkpoint`: the plan over a repository and its files.

The names below are the public ones (``g3n.hub.fetch`` …); the modules hold the rest.
"""

from .fetching import (
    CacheLinkError,
    ContentError,
    DiskFullError,
    FetchError,
    FetchReport,
    HubAccessError,
    cache_root,
    cached_checkpoint,
    fetch,
    fetch_config,
    hf_cache_checkpoint,
    is_offline,
    locate,
    looks_like_hub_id,
    verify,
)

__all__ = ["CacheLinkError", "ContentError", "DiskFullError", "FetchError", "FetchReport", "HubAccessError",
           "cache_root", "cached_checkpoint", "fetch", "fetch_config", "hf_cache_checkpoint", "is_offline",
           "locate", "looks_like_hub_id", "verify"]
