"""One table drives the points page of the docs, the CLI and the injection; the CLI runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from g3n_probe.cli import main
from g3n_probe.points import BY_NAME, POINTS, TABLE, ModuleItself, markdown_table, split_qualified

ROOT = Path(__file__).resolve().parents[1]


def test_docs_table_matches_points():
    page = (ROOT / "docs" / "guides" / "points.md").read_text()
    block = re.search(r"<!-- points-table:start -->\n(.*?)\n<!-- points-table:end -->", page, re.S)
    assert block, "docs/guides/points.md lost its points table markers"
    assert block.group(1).strip() == markdown_table().strip()


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    head = "\n".join(lines[:6])
    assert "make demo" in head and "make test" in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_qualified_names_split_back_into_layer_and_point():
    for point in TABLE:
        for layer in (None, 0, 11, -1):
            name = point.qualified(layer)
            assert split_qualified(name) == (layer, point.name) and BY_NAME[split_qualified(name)[1]] is point
    assert split_qualified("layers.3.mlp") == (3, "mlp")   # a layer's module (a transcoder's site)
    for other in ("layers.x.mlp_out", "layers.3", "layers..mlp_out", "model.layers.3.mlp_out", "layers.3.mlp_out.x",
                  "layers.--3.mlp_out"):
        assert split_qualified(other) == (None, other)


def test_injected_points_follow_the_table(probe):
    layer = probe.hf_model.model.language_model.layers[0]
    from g3n_probe.points import HookPoint

    injected = [name for name, module in layer.named_children() if isinstance(module, HookPoint)]
    expected = [p.name for p in POINTS if p.scope == "layer" and not isinstance(p.route, ModuleItself)]
    assert injected == expected
    model_level = [name for name, module in probe.hf_model.named_children() if isinstance(module, HookPoint)]
    assert model_level == [p.name for p in POINTS if p.scope == "model"]


def test_cli_points(tiny_dir, capsys):
    assert main(["points", str(tiny_dir), "--batch", "2", "--tokens", "5"]) == 0
    out = capsys.readouterr().out
    for point in POINTS:
        assert point.name in out
    assert "[4, 2, 5, 64]" in out  # a stack with the tiny checkpoint's shapes
    assert "4←3" in out and "5←2" in out  # KV sharing


def test_cli_info(tiny_dir, capsys):
    assert main(["info", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "per-layer table" in out and "audio tower" in out and "vision tower" in out
    assert "store" in out and "reuse" in out


def test_cli_demo(tiny_dir, tmp_path, capsys):
    out_png = tmp_path / "demo.png"
    assert main(["demo", "--model", str(tiny_dir), "--out", str(out_png)]) == 0
    assert out_png.exists() and out_png.stat().st_size > 1000
    assert "Logit lens" in capsys.readouterr().out


def test_cli_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().out


# ---- bad input never ends in a traceback: exit 2 and "error: …" naming the argument or file --------------


@pytest.fixture(scope="module")
def broken(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    truncated = Path(shutil.copytree(tiny_dir, root / "truncated"))
    shard = sorted(truncated.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    bad_config = Path(shutil.copytree(tiny_dir, root / "bad_config"))
    config = json.loads((bad_config / "config.json").read_text())
    config["text_config"]["hidden_size"] = -64
    (bad_config / "config.json").write_text(json.dumps(config))
    bad_tokenizer = Path(shutil.copytree(tiny_dir, root / "bad_tokenizer"))
    (bad_tokenizer / "tokenizer.json").write_text("{}")
    return root


@pytest.mark.parametrize("argv,message", [
    (["info", "{root}/truncated"], "is not a readable safetensors file"),
    (["info", "{root}/bad_config"], "text_config.hidden_size must be a positive integer"),
    (["info", "{root}/missing"], "does not exist"),
    (["demo", "--model", "{root}/bad_tokenizer", "--out", "{root}/demo.png"], "tokenizer.json is not a tokenizer definition"),
    (["bench", "--device", "gpu"], "argument --device: 'gpu' is not a device"),
    (["bench", "--device", "cuda"], "argument --device: 'cuda'"),
    (["bench", "--shapes", "0x0"], "argument --shapes: '0x0': batch and tokens must be positive"),
    (["bench", "--shapes", "big"], "argument --shapes: 'big' is not a BxT shape"),
    (["bench", "--leak-traces", "-5"], "argument --leak-traces: must be 0 or more"),
    (["bench", "--repeats", "0"], "argument --repeats: must be a positive integer"),
    (["bench", "--out", "/proc/nope"], "cannot create the output directory /proc/nope"),
    (["points", "--batch", "-1", "--tokens", "0"], "argument --batch: must be a positive integer"),
    (["points", "--symbolic", "--tokens", "x"], "argument --tokens: 'x' is not an integer"),
])
def test_cli_bad_input_exits_2_with_a_message(broken, capsys, argv, message):
    import torch

    if argv[:3] == ["bench", "--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = [a.format(root=broken) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2, text
    assert "error" in text and re.search(message, text.replace("\n", " ")), text
    assert "Traceback" not in text


def test_cli_info_plans_an_accelerator_load_without_a_gpu(tiny_dir, capsys):
    assert main(["info", str(tiny_dir), "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "on the accelerator:" in out and "on the host:" in out
    assert re.search(r"per-layer table.*host", out) and re.search(r"text decoder.*accelerator", out)


def test_version_is_the_package_metadatas(capsys):
    from importlib.metadata import version

    import g3n_probe
    from g3n_probe.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"g3n-probe {version('g3n_probe')}" == f"g3n-probe {g3n_probe.__version__}"
