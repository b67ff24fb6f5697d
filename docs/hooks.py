"""MkDocs hooks for the g3n_probe site.

Reference pages may name an API object that not every version of the package has (the circuits API, added
later). Two guarded directives, resolved when the site is built against whatever the package then holds:

- ``?:: g3n_probe.NAME`` becomes mkdocstrings' ``::: g3n_probe.NAME`` when the name exists, and is dropped
  otherwise;
- ``?-> g3n_probe.NAME`` becomes a list item linking to the name's reference entry when it exists, and is
  dropped otherwise;
- ``?all g3n_probe.MODULE`` becomes the module's docstring and one ``:::`` entry per name in its ``__all__``,
  so names added to ``__all__`` later appear without editing the page.

A public name that is also the name of a submodule (``g3n_probe.sae.evaluate`` the function, beside the module
``g3n_probe/sae/evaluate.py``) is rendered from where it is defined, since a static reading of the package sees
the submodule there.

So a name appears in the reference only once the package has it, and the strict build never breaks over it.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import types

log = logging.getLogger("mkdocs.plugins.g3n_probe")
PLAIN = re.compile(r"^::: (g3n_probe[\w.]*)[ \t]*$(?!\n {4})", re.M)   # an entry without options of its own
DIRECTIVE = re.compile(r"^\?(::|->|all) +([A-Za-z_][\w.]*)\s*$", re.M)


def exists(dotted: str) -> bool:
    """Whether ``dotted`` (``package.attr.attr``) is public in the installed package: each step an attribute
    of the one before, and listed in its ``__all__`` where that module declares one."""
    head, *rest = dotted.split(".")
    try:
        obj = importlib.import_module(head)
    except ImportError:
        return False
    for attr in rest:
        public = getattr(obj, "__all__", None) if isinstance(obj, types.ModuleType) else None
        if public is not None and attr not in public or not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


def resolve(dotted: str):
    """The object a public dotted name stands for."""
    head, *rest = dotted.split(".")
    obj = importlib.import_module(head)
    for attr in rest:
        obj = getattr(obj, attr)
    return obj


def identifier(dotted: str) -> str:
    """The name mkdocstrings finds ``dotted`` under: itself, unless a submodule shadows it statically."""
    parent, _, leaf = dotted.rpartition(".")
    obj = resolve(dotted)
    if parent and not isinstance(obj, types.ModuleType) and f"{parent}.{leaf}" in sys.modules:
        return f"{obj.__module__}.{obj.__qualname__}"
    return dotted


def entry(dotted: str) -> str:
    name = identifier(dotted)
    if name == dotted:
        return f"::: {name}"
    return f"::: {name}\n    options:\n      show_root_full_path: false"


def on_page_markdown(markdown, page, config, files):
    def replace(match: re.Match) -> str:
        kind, name = match.groups()
        if not exists(name):
            log.info("%s: %s is not in this version of the package; left out", page.file.src_path, name)
            return ""
        if kind == "::":
            return entry(name)
        if kind == "->":
            return f"- [`{name}`][{identifier(name)}]"
        module = resolve(name)
        blocks = [f"::: {name}\n    options:\n      members: false"]
        blocks += [entry(f"{name}.{member}") for member in module.__all__]
        return "\n\n".join(blocks)

    def shadowed(match: re.Match) -> str:
        name = match.group(1)
        return entry(name) if exists(name) else match.group(0)

    return PLAIN.sub(shadowed, DIRECTIVE.sub(replace, markdown))


# nbconvert's page template carries a module script that imports mermaid from cdnjs when a notebook holds a
# mermaid diagram. These notebooks hold none, and the site makes no request outside itself: drop the loader.
CDN_LOADER = re.compile(r"<script type=\"module\">(?:(?!</script>).)*?https://cdnjs\.cloudflare\.com/(?:(?!</script>).)*?</script>",
                        re.S)


def on_post_page(output, page, config):
    return CDN_LOADER.sub("", output)
