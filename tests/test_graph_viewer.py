"""The attribution-graph viewer and its server: the page requests nothing and escapes what it embeds, the server
stays on 127.0.0.1 and inside its directory, ``g3n-probe attribute`` splits prompts across torchrun ranks, and
the page in a real headless chromium (tests/browser.py) draws one element per node and per link, shows a node
on hover and pins it on click. Saves a screenshot to docs/assets/graph_viewer.png.

The browser test is skipped only when no chromium binary exists outside CI (.ci/run installs Debian's and sets
G3N_REQUIRE_BROWSER=1, under which a missing browser is a failure)."""

from __future__ import annotations

import html.parser
import http.client
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from g3n_probe.circuits import Graph, attribute
from g3n_probe.circuits import files as graph_files
from g3n_probe.circuits.serve import serve
from g3n_probe.circuits.viewer import iframe, page, write_page
from g3n_probe.cli.commands import main
from g3n_probe.sae.transcoders import Transcoder, save_transcoders

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "assets" / "graph_viewer.png"
REQUIRED = os.environ.get("G3N_REQUIRE_BROWSER") == "1"
PROMPTS = ["The capital of France is", "One two three", "def f(x):"]
HOSTILE = '</script><script>alert(1)</script>"&<!--'


def _transcoders(probe, seed: int = 0) -> dict[int, Transcoder]:
    generator = torch.Generator().manual_seed(seed)
    d = probe.text_config.hidden_size

    def rand(*shape, scale):
        return torch.randn(*shape, generator=generator) * scale

    return {layer: Transcoder(rand(32, d, scale=0.3), rand(32, d, scale=0.05), rand(32, scale=0.1),
                              rand(d, scale=0.01), layer=layer)
            for layer in range(probe.text_config.num_hidden_layers)}


@pytest.fixture(scope="module")
def pruned(probe) -> Graph:
    return attribute(probe, "The capital of France is", _transcoders(probe), batch_size=32).prune()


@pytest.fixture(scope="module")
def graph_dir(pruned, tmp_path_factory) -> Path:
    """``capital``: the tiny synthetic model, random transcoders; ``prompt-0000``: ``g3n-probe attribute`` with
    its defaults (the bundled model and its trained transcoders)."""
    root = tmp_path_factory.mktemp("graphs")
    pruned.save(root, "capital")
    (root / "prompts.txt").write_text(PROMPTS[0] + "\n")
    assert main(["attribute", "--prompts", str(root / "prompts.txt"), "--out", str(root)]) == 0
    return root


@pytest.fixture
def server(graph_dir):
    running = serve(graph_dir)
    yield running
    running.shutdown()
    running.server_close()


def _get(server, path: str, host: str | None = None, method: str = "GET") -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest(method, path, skip_host=True)
    connection.putheader("Host", host or f"127.0.0.1:{server.port}")
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, response.getheader("Content-Type") or "", body


# ---- the page: self-contained, escaped ------------------------------------------------------------------------


def _data(pruned) -> dict:
    data = graph_files.to_json(pruned, "capital")
    data["metadata"]["prompt_tokens"][1] = HOSTILE
    data["nodes"][0]["clerp"] = HOSTILE
    return data


def test_page_requests_nothing_and_embeds_the_graph_verbatim(pruned):
    data = _data(pruned)
    text = page(data)
    assert not re.search(r"""(src|href|action|srcset)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", text, re.I)
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    assert HOSTILE not in text and "<script>alert" not in text   # the JSON cannot end its script element
    payload = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', text, re.S).group(1)
    assert json.loads(payload) == data
    assert text.count("</script>") == 2 and page(pruned).count("data-ready") == 1
    assert json.loads(re.search(r'id="graph-data">(.*?)</script>', page(pruned), re.S).group(1)) == \
        graph_files.to_json(pruned)


class _Frame(html.parser.HTMLParser):
    def handle_starttag(self, tag, attrs):
        if tag == "iframe":
            self.attrs = dict(attrs)


def test_iframe_escapes_the_page_into_srcdoc(pruned, tmp_path):
    data = _data(pruned)
    wrapped = iframe(data, height=300)
    assert wrapped.startswith("<iframe srcdoc=\"") and wrapped.endswith("</iframe>")
    attribute_text = wrapped[len('<iframe srcdoc="'):wrapped.index('" style=')]
    assert '"' not in attribute_text and "<" not in attribute_text and ">" not in attribute_text
    parser = _Frame()
    parser.feed(wrapped)
    assert parser.attrs["srcdoc"] == page(data)            # the browser reads back exactly the page
    assert parser.attrs["sandbox"] == "allow-scripts" and "height:300px" in parser.attrs["style"]
    assert pruned._repr_html_() == iframe(graph_files.to_json(pruned))
    with pytest.raises(ValueError, match="height"):
        iframe(data, height=0)
    with pytest.raises(ValueError, match="nodes"):
        page({"metadata": {}})
    path = write_page(pruned, tmp_path / "sub" / "graph.html")
    assert path.read_text(encoding="utf-8") == page(pruned)


# ---- the server: 127.0.0.1, inside its directory ----------------------------------------------------------------


def test_server_lists_serves_pages_and_json(server, graph_dir, pruned):
    assert server.server_address[0] == "127.0.0.1" and server.url == f"http://127.0.0.1:{server.port}/"
    status, kind, body = _get(server, "/")
    assert status == 200 and kind.startswith("text/html")
    assert 'href="/graph/capital"' in body.decode() and 'href="/capital.json"' in body.decode()
    status, kind, body = _get(server, "/graph/capital")
    assert status == 200 and kind.startswith("text/html")
    assert body.decode() == page(json.loads((graph_dir / "capital.json").read_text()))
    status, kind, body = _get(server, "/capital.json")
    assert status == 200 and kind.startswith("application/json") and body == (graph_dir / "capital.json").read_bytes()
    assert _get(server, "/graph-metadata.json")[0] == 200
    assert _get(server, "/graph/capital", method="HEAD")[:2] == (200, "text/html; charset=utf-8")
    assert len(Graph.load(graph_dir / "capital.json")) == len(pruned)


def test_server_refuses_traversal_symlinks_other_hosts(server, graph_dir, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": 1}')
    (graph_dir / "link.json").symlink_to(secret)
    (graph_dir / ".hidden.json").write_text("{}")
    (graph_dir / "broken.json").write_text("not json")
    try:
        for path in ("/../secret.json", "/%2e%2e/secret.json", "/graph/..%2fsecret", "/graph/../secret",
                     "/link.json", "/graph/link", "/.hidden.json", "/graph/.hidden", "/graph/%2e%2e%2f" + "x",
                     "/graph/nope", "/nope.json", "/graph-metadata.json/..", "/etc/passwd", "/graph/capital%00"):
            status, _, body = _get(server, path)
            assert status == 404, (path, status)
            assert b"secret" not in body
        assert _get(server, "/graph/broken")[0] == 422
        assert _get(server, "/", host="evil.example:80")[0] == 403        # DNS rebinding
        assert _get(server, "/", host=f"localhost:{server.port}")[0] == 200
        assert _get(server, "/", method="POST")[0] == 501
    finally:
        for name in ("link.json", ".hidden.json", "broken.json"):
            (graph_dir / name).unlink()
    with pytest.raises(NotADirectoryError):
        serve(tmp_path / "absent")
    with pytest.raises(ValueError, match="port"):
        serve(graph_dir, port=70000)


def test_graph_serve_command_runs_until_stopped(graph_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "g3n_probe.cli", "graph", "serve", str(graph_dir),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/graph/capital")
        response = connection.getresponse()
        assert response.status == 200 and b'class="node' not in response.read()   # nodes are drawn by the script
    finally:
        process.terminate()
        process.wait(30)
        process.stdout.close()
        process.stderr.close()
    assert main(["graph", "serve", str(graph_dir / "absent")]) == 2


# ---- g3n-probe attribute: one graph per prompt, split across ranks ---------------------------------------------

def test_attribute_command_under_torchrun(probe, tiny_dir, tmp_path):
    save_transcoders(tmp_path / "tc", _transcoders(probe, seed=1))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "graphs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29645", "-m", "g3n_probe.cli", "attribute",
                           "--prompts", str(tmp_path / "prompts.txt"), "--transcoders", str(tmp_path / "tc"),
                           "--out", str(out), "--model", str(tiny_dir), "--max-feature-nodes", "16",
                           "--batch-size", "32", "--node-threshold", "0.9"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    done_by = {rank: sorted(re.findall(rf"\[rank {rank}/2\] \S*prompt-(\d+)\.json", done.stdout)) for rank in (0, 1)}
    assert done_by == {0: ["0000", "0002"], 1: ["0001"]}, done.stdout
    index = json.loads((out / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in index["graphs"]) == ["prompt-0000", "prompt-0001", "prompt-0002"]
    saved = Graph.load(out / "prompt-0001.json")
    direct = attribute(probe, PROMPTS[1], _transcoders(probe, seed=1), max_feature_nodes=16,
                       batch_size=32).prune(node_threshold=0.9)
    assert [graph_files.node_id(n, direct.layers) for n in saved.nodes] == \
        [graph_files.node_id(n, direct.layers) for n in direct.nodes]
    torch.testing.assert_close(saved.adjacency, direct.adjacency, rtol=1e-4, atol=1e-5)


def test_attribute_command_defaults_to_the_bundled_model_and_transcoders(graph_dir):
    import g3n_probe as g3n

    index = json.loads((graph_dir / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in index["graphs"]) == ["capital", "prompt-0000"]
    saved = Graph.load(graph_dir / "prompt-0000.json")
    direct = attribute(g3n.load(), PROMPTS[0], g3n.sae.default_transcoders()).prune()
    assert [graph_files.node_id(n, direct.layers) for n in saved.nodes] == \
        [graph_files.node_id(n, direct.layers) for n in direct.nodes]
    torch.testing.assert_close(saved.adjacency, direct.adjacency, rtol=1e-4, atol=1e-5)


def test_attribute_command_refuses_bad_input(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a\n\nb\n")
    assert main(["attribute", "--prompts", str(tmp_path / "prompts.txt"), "--transcoders", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "line 2 is empty" in capsys.readouterr().out
    (tmp_path / "prompts.txt").write_text("a\n")
    assert main(["attribute", "--prompts", str(tmp_path / "prompts.txt"), "--model", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--transcoders is required with --model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["attribute", "--prompts", "p", "--transcoders", "t", "--out", "o", "--edge-threshold", "1.5"])


# ---- the page in a real browser -------------------------------------------------------------------------------


def _browser_or_skip():
    browser = pytest.importorskip("browser")
    if browser.find_chromium() is None:
        reason = f"no chromium binary found (looked for {', '.join(browser.CANDIDATES)}); .ci/run installs Debian's"
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        import websocket  # noqa: F401  (the docs extra)
    except ImportError:
        if REQUIRED:
            raise
        pytest.skip("websocket-client (the docs extra) is not installed: pip install -e '.[docs]'")
    return browser.Browser


def _center(browser, selector: str) -> tuple[float, float]:
    return tuple(browser.evaluate(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
        e.scrollIntoView({{block: 'center', inline: 'center'}}); const r = e.getBoundingClientRect();
        return [r.left + r.width / 2, r.top + r.height / 2]; }})()"""))


def _click(browser, x: float, y: float) -> None:
    browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    for kind in ("mousePressed", "mouseReleased"):
        browser.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def _drawn(browser, url: str, data: dict) -> None:
    """The page at ``url`` drew one element per node and per link of ``data``, in its order."""
    browser.open(url)
    browser.wait_for("document.body.dataset.ready === '1'")
    assert browser.evaluate("document.querySelectorAll('svg .node').length") == len(data["nodes"])
    assert browser.evaluate("document.querySelectorAll('svg .link').length") == len(data["links"])
    assert browser.evaluate("[...document.querySelectorAll('.node')].map(e => e.dataset.nodeId)") == \
        [n["node_id"] for n in data["nodes"]]


def test_viewer_in_a_browser(server, pruned, graph_dir, tmp_path):
    browser_class = _browser_or_skip()
    assert len(graph_files.to_json(pruned)["links"]) == int((pruned.adjacency != 0).sum())
    data = json.loads((graph_dir / "prompt-0000.json").read_text())
    with browser_class(width=1400, height=800) as browser:
        browser.open(server.url)
        assert browser.evaluate("document.querySelectorAll('a[href^=\"/graph/\"]').length") == 2
        _drawn(browser, server.url + "graph/capital", graph_files.to_json(pruned, "capital"))
        _drawn(browser, server.url + "graph/prompt-0000", data)
        # hover: the side panel shows the node under the mouse (the most likely next token)
        logit = next(n for n in data["nodes"] if n["feature_type"] == "logit")
        selector = f'.node[data-node-id="{logit["node_id"]}"]'
        x, y = _center(browser, selector)
        browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        browser.wait_for(f"document.querySelector('#side h2').textContent === {json.dumps(logit['clerp'])}")
        assert "logit" in browser.evaluate("document.getElementById('side').innerText")
        # click pins it and highlights its edges; a second click unpins it
        _click(browser, x, y)
        assert browser.evaluate(f"document.querySelector({json.dumps(selector)}).classList.contains('pinned')")
        edges = sum(logit["node_id"] in (link["source"], link["target"]) for link in data["links"])
        assert edges > 0 and browser.evaluate("document.querySelectorAll('.link.active').length") == edges
        assert browser.evaluate("document.querySelector('svg').classList.contains('has-pin')")
        assert browser.evaluate("document.getElementById('side').innerText").count("\n") > 10   # its edges listed
        browser.screenshot(pytest.importorskip("browser").screenshot_target(SCREENSHOT, tmp_path))
        _click(browser, x, y)
        assert browser.evaluate("document.querySelectorAll('.pinned, .link.active').length") == 0
        base = server.url
        assert browser.outside(base) == [], f"requests outside 127.0.0.1: {browser.outside(base)}"
        assert browser.failed == [], f"failed requests: {browser.failed}"
        assert browser.errors == [], f"console errors: {browser.errors}"
    assert SCREENSHOT.stat().st_size > 10_000
