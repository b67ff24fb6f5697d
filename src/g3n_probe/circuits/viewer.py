"""An offline viewer for attribution graphs: one self-contained HTML page (inline CSS and script, a
Content-Security-Policy that forbids every request, so the page fetches nothing: no script, font or image).

The page (its template is ``viewer.html`` beside this module) draws the graph in SVG: one row per layer
(embeddings at the bottom, then each layer's PLE, error and feature nodes, the logits at the top), one column per
prompt position, the prompt's tokens along the axis; one element of class ``node`` per node (``data-node-id``)
and one of class ``link`` per link, its width and opacity scaled by ``|weight|``, blue when positive, red when
negative. Hovering a node shows its details in the side panel; a click pins it (class ``pinned``) and
highlights its edges, a second click unpins it.

    page(data)                 the page's HTML (``data``: circuit-tracer's JSON, `files.to_json`)
    iframe(data)               the page in an ``<iframe srcdoc>`` (notebooks: `Graph._repr_html_`, `Graph.show`)
    write_page(graph, path)    a standalone ``.html`` file
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from . import files

#: What a JSON string may hold that would end or confuse the ``<script>`` element around it.
_SCRIPT_SAFE = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026", 0x2028: "\\u2028", 0x2029: "\\u2029"}


@lru_cache(maxsize=1)
def template() -> str:
    """The page's template (``viewer.html``, shipped as package data)."""
    return resources.files(__package__).joinpath("viewer.html").read_text(encoding="utf-8")


def _as_data(graph_or_data: Any) -> dict[str, Any]:
    if isinstance(graph_or_data, dict):
        return graph_or_data
    return files.to_json(graph_or_data)   # a Graph


def page(data: dict[str, Any]) -> str:
    """A whole HTML page drawing the graph ``data`` (circuit-tracer's JSON schema, as `files.to_json` writes it;
    a `Graph` is converted first)."""
    data = _as_data(data)
    for key in ("nodes", "links"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"not an attribution graph: {key!r} is missing or not a list")
    payload = json.dumps(data, allow_nan=False).translate(_SCRIPT_SAFE)
    meta = data.get("metadata") or {}
    title = html.escape(str(meta.get("slug") or meta.get("prompt") or "attribution graph")[:120])
    head, rest = template().split("__GRAPH_JSON__", 1)
    return head.replace("__TITLE__", title, 1) + payload + rest


def iframe(data: dict[str, Any], height: int = 640) -> str:
    """The page in an ``<iframe srcdoc>``: notebooks run its script in the frame (the page escaped once, for
    the attribute)."""
    if isinstance(height, bool) or not isinstance(height, int) or height < 1:
        raise ValueError(f"height must be a positive integer; got {height!r}")
    return (f'<iframe srcdoc="{html.escape(page(data), quote=True)}" '
            f'style="width:100%;height:{height}px;border:0" sandbox="allow-scripts"></iframe>')


def write_page(graph_or_data: Any, path: str | Path) -> Path:
    """Save the page of a `Graph` (or of its JSON ``data``) as a standalone ``.html`` file; returns its path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page(_as_data(graph_or_data)), encoding="utf-8")
    return target
