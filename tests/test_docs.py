"""The documentation: every public name has a docstring and an entry in the API reference, the site's
configuration makes no request outside itself, and (with the docs extra) it builds strictly and offline with
no outside script, stylesheet or image."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import inspect
import re

import pytest
import yaml

import g3n_probe
from docs_site import REQUIRED, ROOT, built_site, missing_docs_tools

REFERENCE = ROOT / "docs" / "reference"
# Public beyond the ``__all__`` lists: the entry points of the analysis and checkpoint modules.
EXTRA = [
    "g3n_probe.patching.sweep", "g3n_probe.patching.attribution", "g3n_probe.patching.PatchingResult",
    "g3n_probe.matformer.submodel", "g3n_probe.matformer.save",
    "g3n_probe.synthetic.save_checkpoint", "g3n_probe.synthetic.random_model",
    "g3n_probe.hub.fetch", "g3n_probe.hub.verify", "g3n_probe.hub.fetch_config", "g3n_probe.hub.cached_checkpoint",
    "g3n_probe.hub.FetchReport", "g3n_probe.hub.FetchError", "g3n_probe.hub.ContentError",
    "g3n_probe.hub.CacheLinkError", "g3n_probe.hub.DiskFullError", "g3n_probe.hub.HubAccessError",
]


def resolve(dotted: str):
    obj = g3n_probe
    for attr in dotted.split(".")[1:]:
        obj = getattr(obj, attr)
    return obj


def public_names() -> list[str]:
    names = [f"g3n_probe.{n}" for n in g3n_probe.__all__]
    names += [f"g3n_probe.sae.{n}" for n in g3n_probe.sae.__all__]
    circuits = getattr(g3n_probe, "circuits", None)   # the circuits API, where this version has it
    names += [f"g3n_probe.circuits.{n}" for n in getattr(circuits, "__all__", [])]
    return names + EXTRA


def is_data(obj) -> bool:
    return not (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj))


def own_docstring(obj) -> str:
    """The object's own docstring: a class's is not inherited, and a dataclass's generated signature is none."""
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__")
        if dataclasses.is_dataclass(obj) and doc and doc.startswith(obj.__name__ + "("):
            doc = None
    else:
        doc = getattr(obj, "__doc__", None)
    return (doc or "").strip()


def reference_text() -> str:
    return "\n".join(page.read_text() for page in sorted(REFERENCE.glob("*.md")))


def test_every_public_name_has_a_docstring():
    missing = [name for name in public_names() if not is_data(resolve(name)) and not own_docstring(resolve(name))]
    assert not missing, f"public names without a docstring: {missing}"


def test_every_public_name_has_an_entry_in_the_reference():
    text = reference_text()
    entries = set(re.findall(r"^(?::::|\?::|\?->) +(g3n_probe[\w.]*)", text, re.M))
    whole = set(re.findall(r"^\?all +(g3n_probe[\w.]*)", text, re.M))   # every name in that module's __all__
    described = set(re.findall(r"^#+ `(g3n_probe[\w.]*)`", text, re.M))  # data: a heading and prose
    missing = [name for name in public_names()
               if name not in entries | described | whole and name.rpartition(".")[0] not in whole]
    assert not missing, f"public names missing from docs/reference/: {missing}"


def test_the_circuits_api_is_listed_once_it_exists():
    text = (REFERENCE / "circuits.md").read_text()
    for name in ("g3n_probe.attribute", "g3n_probe.Graph"):
        assert f"?:: {name}" in text
    for name in ("load_transcoders", "save_transcoders", "train_transcoders", "replaced"):
        assert f"?-> g3n_probe.sae.{name}" in text


def test_the_version_comes_from_the_package_metadata():
    assert g3n_probe.__version__ == importlib.metadata.version("g3n_probe")


def test_the_site_configuration_requests_nothing_outside():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["font"] is False, "theme.font must be false: Google Fonts is a request outside"
    plugins = {}
    for plugin in config["plugins"]:
        plugins.update(plugin if isinstance(plugin, dict) else {plugin: {}})
    assert not {"social", "privacy", "optimize", "material/social", "material/privacy"} & set(plugins)
    assert plugins["mkdocs-jupyter"]["execute"] is False
    assert plugins["mkdocs-jupyter"]["include_requirejs"] is False


def test_every_notebook_is_in_the_navigation():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config["docs_dir"] = str(ROOT / "docs")
    listed = set(re.findall(r"notebooks/(\w+)\.ipynb", str(hooks.on_config(config)["nav"])))
    assert listed == {path.stem for path in (ROOT / "notebooks").glob("*.ipynb")}
    page = hooks.notebook_sections((ROOT / "docs" / "notebooks.md").read_text(), config["docs_dir"])
    assert all(f"notebooks/{path.name}" in page for path in (ROOT / "notebooks").glob("*.ipynb"))


OUTSIDE = [
    re.compile(r"<script[^>]*\ssrc=[\"']?(?:https?:)?//", re.I),
    re.compile(r"<link[^>]*\shref=[\"']?(?:https?:)?//[^>]*>", re.I),
    re.compile(r"<(?:img|iframe|source|video|audio)[^>]*\ssrc=[\"']?(?:https?:)?//", re.I),
    re.compile(r"@import\s+(?:url\()?[\"']?(?:https?:)?//", re.I),
    re.compile(r"import\(\s*[\"']https?://", re.I),
]


def test_the_site_builds_strictly_with_nothing_from_outside():
    missing = missing_docs_tools()
    if missing:
        if REQUIRED:
            pytest.fail(f"the docs extra is not installed (missing {missing}): pip install -e '.[docs]'")
        pytest.skip(f"the docs extra is not installed (missing {missing}): pip install -e '.[docs]'")
    site = built_site()
    pages = sorted(site.rglob("*.html"))
    assert (site / "index.html").exists() and (site / "search" / "search_index.json").exists()
    for page in ("reference/loading/index.html", "guides/points/index.html", "notebooks/01_quickstart/index.html"):
        assert (site / page).exists(), page
    assert 'id="g3n_probe.load"' in (site / "reference" / "loading" / "index.html").read_text()
    found = [(str(page.relative_to(site)), match.group(0)[:120])
             for page in pages for pattern in OUTSIDE for match in pattern.finditer(page.read_text())]
    assert not found, f"the site loads something from outside: {found[:10]}"
