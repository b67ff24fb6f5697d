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
Likewise a notebook added to ``notebooks/`` joins the navigation's "Notebooks" section by itself (titled from its
file name) if ``mkdocs.yml`` does not list it.
"""

from __future__ import annotations

import importlib
import logging
import re
import types
from pathlib import Path

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
    """The name mkdocstrings finds ``dotted`` under: itself, unless a package re-exports it from a submodule of
    the same name (``sae/evaluate.py``'s ``evaluate``), which a static reading sees in its place."""
    obj = resolve(dotted)
    if not isinstance(obj, types.ModuleType) and obj.__module__.rpartition(".")[2] == getattr(obj, "__name__", None):
        return f"{obj.__module__}.{obj.__qualname__}"
    return dotted


def entry(dotted: str) -> str:
    """The mkdocstrings entry for a public name; a module's is its docstring alone (its members have their own)."""
    name = identifier(dotted)
    options = []
    if name != dotted:
        options.append("show_root_full_path: false")
    if isinstance(resolve(dotted), types.ModuleType):
        options.append("members: false")
    return f"::: {name}" + ("\n    options:" + "".join(f"\n      {o}" for o in options) if options else "")


def module_entries(name: str, markdown: str) -> str:
    """A module's docstring and an entry per name in its ``__all__``, but for objects this page already shows
    under another public name (``g3n_probe.attribute`` and ``g3n_probe.circuits.attribute``)."""
    shown = [resolve(n) for n in re.findall(r"^(?:\?::|:::) +(g3n_probe[\w.]*)", markdown, re.M) if exists(n)]
    module = resolve(name)
    members = [m for m in module.__all__ if not any(getattr(module, m) is obj for obj in shown)]
    return "\n\n".join([entry(name)] + [entry(f"{name}.{member}") for member in members])


def notebook_title(path: Path) -> str:
    """``10_circuits.ipynb`` → ``10 Circuits``."""
    number, _, rest = path.stem.partition("_")
    return f"{number} {rest.replace('_', ' ').capitalize()}" if number.isdigit() else path.stem.replace("_", " ")


def on_config(config):
    folder = Path(config["docs_dir"]) / "notebooks"
    for section in config["nav"] or []:
        if isinstance(section, dict) and "Notebooks" in section:
            entries = section["Notebooks"]
            listed = {next(iter(e.values())) if isinstance(e, dict) else e for e in entries}
            for path in sorted(folder.glob("*.ipynb")):
                if f"notebooks/{path.name}" not in listed:
                    entries.append({notebook_title(path): f"notebooks/{path.name}"})
    return config


def notebook_sections(markdown: str, docs_dir: str) -> str:
    """The notebooks page: a section for each notebook it does not mention yet, with the figures it saves."""
    for path in sorted((Path(docs_dir) / "notebooks").glob("*.ipynb")):
        if f"notebooks/{path.name}" in markdown:
            continue
        markdown += f"\n## [{notebook_title(path)}](notebooks/{path.name})\n"
        number = path.stem.partition("_")[0]
        for figure in sorted(Path(docs_dir).glob(f"{number}_*.png")):
            markdown += f"\n![{notebook_title(path)}]({figure.name})\n"
    return markdown


def on_page_markdown(markdown, page, config, files):
    if page.file.src_path == "notebooks.md":
        markdown = notebook_sections(markdown, config["docs_dir"])

    def replace(match: re.Match) -> str:
        kind, name = match.groups()
        if not exists(name):
            log.info("%s: %s is not in this version of the package; left out", page.file.src_path, name)
            return ""
        if kind == "::":
            return entry(name)
        if kind == "->":
            return f"- [`{name}`][{identifier(name)}]"
        return module_entries(name, markdown)

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
