"""``g3n-probe``: info, points, demo (and the benchmark and audit entry points).

    g3n-probe info [SOURCE]        config, components (stored vs loaded), layers
    g3n-probe points [SOURCE]      the intervention-point table with this checkpoint's shapes
    g3n-probe demo [--model SRC]   trace a code prompt, logit lens through the AltUp merge, ablations
    g3n-probe bench [--device cuda] memory and speed, per-layer table on the device vs the host
    g3n-probe audit [SOURCE] [--prompt TEXT ...]  where transformers and Google's reference differ
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import arch



# ---- argument types: bad values are argparse errors (exit 2, "error: argument …"), never tracebacks ----


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}; got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "0 or more")


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        batch, tokens = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a BxT shape such as 1x128") from None
    if batch < 1 or tokens < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch and tokens must be positive")
    return batch, tokens


def _device(text: str) -> str:
    import torch

    from .loading import SUPPORTED_DEVICES

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; choose {' or '.join(SUPPORTED_DEVICES)}") from None
    if device.type not in SUPPORTED_DEVICES:
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; choose {' or '.join(SUPPORTED_DEVICES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
    return text


def _writable_directory(path: Path) -> Path:
    """Checked before any work starts, so a run never fails at its very end for want of a place to write."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the output directory {path}: {error.strerror or error}") from None
    if not path.is_dir() or not os.access(path, os.W_OK):
        raise ValueError(f"the output directory {path} is not a writable directory")
    return path


def _make_console() -> Console:
    # Wide tables stay readable in logs and notebooks, where there is no terminal width to fit.
    return Console(width=None if sys.stdout.isatty() else 200)


console = _make_console()


def _gib(nbytes: float) -> str:
    return f"{nbytes / 1024**3:.3f} GiB" if nbytes >= 1024**3 / 100 else f"{nbytes / 1024**2:.2f} MiB"


def stored_components(directory: Path) -> dict[str, dict[str, Any]]:
    """Parameters and bytes per component as stored, from the safetensors headers (no tensor data)."""
    from ._util import SAFETENSORS_DTYPE_BYTES
    from .loading import COMPONENTS, CheckpointError, component_of, open_safetensors, weight_map

    mapping = weight_map(directory)
    result = {c: {"params": 0, "bytes": 0, "absent": 0} for c in COMPONENTS}
    by_file: dict[str, list[str]] = {}
    for key, filename in mapping.items():
        by_file.setdefault(filename, []).append(key)
    for filename, keys in by_file.items():
        path = directory / filename
        if not path.exists():
            for key in keys:
                result[component_of(key)]["absent"] += 1
            continue
        with open_safetensors(path) as handle:
            present = set(handle.keys())
            for key in keys:
                if key not in present:
                    raise CheckpointError(f"{path} does not contain {key}, although the index says it does")
                piece = handle.get_slice(key)
                numel = math.prod(piece.get_shape())
                entry = result[component_of(key)]
                entry["params"] += numel
                entry["bytes"] += numel * SAFETENSORS_DTYPE_BYTES.get(piece.get_dtype(), 4)
    return result


def layer_rows(config: Any) -> list[dict[str, Any]]:
    text = config.get_text_config()
    modes, sources = text.kv_sharing_modes, arch.kv_sources(text)
    rows = []
    for i in range(text.num_hidden_layers):
        kind = text.layer_types[i]
        source = sources.get(i)
        rows.append({
            "layer": i, "attention": kind.replace("_attention", ""),
            "kv": modes[i] or "own", "kv_source": source,
            "sparsity": text.activation_sparsity_pattern[i], "ffn": text.intermediate_size[i],
        })
    return rows


def cmd_info(args: argparse.Namespace) -> int:
    from .loading import read_config, resolve_source

    directory = resolve_source(args.source, **_hub_options(args), config_only=True)
    config = read_config(directory)
    text = config.get_text_config()
    summary = Table(title=f"Gemma 3n checkpoint: {directory}", show_header=False)
    for label, value in [
        ("layers", text.num_hidden_layers), ("hidden size D", text.hidden_size),
        ("AltUp streams S", text.altup_num_inputs), ("per-layer input width P", text.hidden_size_per_layer_input),
        ("heads / kv heads / head dim", f"{text.num_attention_heads} / {text.num_key_value_heads} / {text.head_dim}"),
        ("vocabulary", f"{text.vocab_size} ({text.vocab_size_per_layer_input} text, then vision and audio soft tokens)"),
        ("sliding window", text.sliding_window), ("KV-shared layers", text.num_kv_shared_layers),
        ("LAuReL rank", text.laurel_rank), ("final logit soft cap", text.final_logit_softcapping),
        ("AltUp coefficient clip", text.altup_coef_clip),
    ]:
        summary.add_row(label, str(value))
    console.print(summary)

    from .loading import COMPONENTS, footprint

    stored = stored_components(directory)
    import torch

    from .loading import _resolve_device, _resolve_dtype

    device = torch.device(args.device) if args.device else _resolve_device(None)
    dtype = _resolve_dtype(args.dtype, device)  # what g3n.load would pick for this device
    plan = footprint(config, device=device, dtype=dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    components = Table(title=f"Components (loaded = what g3n.load(device={device.type!r}) allocates, {dtype_name}, and where)")
    for column in ("component", "stored params", "stored bytes", "loaded params", "loaded bytes", "lives on"):
        components.add_column(column, justify="right" if column not in ("component", "lives on") else "left")
    for name in COMPONENTS:
        s, l = stored[name], plan[name]
        note = f" ({s['absent']} tensors' shards absent)" if s["absent"] else ""
        where = l["where"] if l["params"] else "not loaded" if s["params"] else ""
        components.add_row(name, f"{s['params']:,}{note}", _gib(s["bytes"]), f"{l['params']:,}", _gib(l["bytes"]), where)
    console.print(components)
    if all(s["absent"] and not s["params"] for s in stored.values() if s["absent"] or s["params"]):
        console.print(f"weights not fetched (config only): `g3n-probe fetch {args.source}` fetches the text-only "
                      "checkpoint", markup=False)
    totals = {where: sum(c["bytes"] for c in plan.values() if c["where"] == where) for where in ("accelerator", "host")}
    console.print(f"on the accelerator: {_gib(totals['accelerator'])}; on the host: {_gib(totals['host'])} "
                  "(parameters and buffers; activations and the KV cache come on top)")

    layers = Table(title="Layers")
    for column in ("layer", "attention", "KV", "reads K/V of", "sparsity", "FFN width"):
        layers.add_column(column)
    for row in layer_rows(config):
        layers.add_row(str(row["layer"]), row["attention"], row["kv"],
                       "" if row["kv_source"] is None else str(row["kv_source"]),
                       f"{row['sparsity']:.2f}" if row["sparsity"] else "dense", str(row["ffn"]))
    console.print(layers)
    return 0


def cmd_points(args: argparse.Namespace) -> int:
    from .loading import read_config, resolve_source
    from .points import POINTS, concrete_shape

    config = (read_config(resolve_source(args.source, **_hub_options(args), config_only=True))
              if args.source or not args.symbolic else None)
    table = Table(title="Intervention points, all writable (inside one trace, access them in this order)")
    for column in ("where", "name", "shape", "value", "produced at"):
        table.add_column(column)
    for point in POINTS:
        where = "model.layers[i]" if point.scope == "layer" else "model"
        shape = point.shape
        if config is not None:
            shape = f"{point.shape} = {list(concrete_shape(point, config, args.batch, args.tokens))}"
        note = " (eager attention only)" if point.needs == "eager" else ""
        table.add_row(where, point.name, shape, point.meaning + note, point.produced)
    console.print(table)
    if config is not None:
        rows = layer_rows(config)
        reuse = [f"{r['layer']}←{r['kv_source']}" for r in rows if r["kv_source"] is not None]
        if reuse:
            console.print(f"KV sharing (layer←layer whose K/V it reads): {', '.join(reuse)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    out = Path(args.out)
    _writable_directory(out.parent if str(out.parent) else Path("."))
    run_demo(args.model, out=out, prompt=args.prompt, console=console, load_options=_hub_options(args))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from . import load
    from .audit import audit

    model = load(args.source, **_hub_options(args))
    report = audit(model, args.prompt or None)
    table = Table(title=f"Faithfulness audit: {model.load_report.source}")
    for column in ("difference", "where", "value"):
        table.add_column(column)
    for c in report.coefficients_beyond_clip:
        table.add_row("AltUp coefficient beyond clip", f"layer {c['layer']} {c['matrix']}{list(c['index'])}",
                      f"{c['value']:g} (clip ±{report.clip:g})")
    for h in report.epsilon_hits:
        table.add_row("stream-magnitude epsilon", f"{h['where']}, prompt {h['prompt']}, token {h['token']}, stream {h['stream']}",
                      f"rms {h['rms']:.3e}")
    table.add_row("final soft cap", "logits", "none in the reference" if report.softcap is None else
                  f"{report.softcap:g} here, none in the reference")
    console.print(table)
    console.print(f"[bold]verdict:[/bold] {report.verdict}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    preset = args.preset or ("e2b" if args.device.startswith("cuda") else "tiny")
    out = _writable_directory(Path(args.out))
    results = run_bench(preset, device=args.device, shapes=args.shapes or None, repeats=args.repeats,
                        leak_traces=args.leak_traces, out_dir=out, print_fn=console.print)
    if not args.check:
        return 0
    return _gpu_check(args, preset, out, results)


def _gpu_check(args: argparse.Namespace, preset: str, out: Path, results: dict) -> int:
    """Every performance target in one run: writes the synthetic checkpoint, measures G5 on it and the
    patching throughput (G6), evaluates G1–G6 on the run's figures, writes gpu_check_<device>_<preset>.{json,md},
    and fails on a missed target."""
    import json
    import shutil
    import tempfile

    import torch

    from .bench import check_markdown, check_targets, measure_load, measure_patching
    from .probe import Gemma3nProbe
    from .synthetic import build_tokenizer, random_model, save_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix="g3n_gpu_check_"))
    try:
        console.print(f"writing the synthetic {preset} checkpoint to {scratch} ...")
        checkpoint = save_checkpoint(scratch / preset, preset)
        results["load"] = measure_load(checkpoint, args.device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    console.print("patching: sweep vs one trace per patch ...")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    module = random_model(preset, device=args.device, dtype=dtype)
    layers = module.config.get_text_config().num_hidden_layers
    # Two layers × every position keeps the one-trace-per-patch side to a few hundred traces.
    results["patching"] = measure_patching(Gemma3nProbe(module, tokenizer=build_tokenizer(module.config)),
                                           tokens=128 if args.device.startswith("cuda") else 16,
                                           chunk=64 if args.device.startswith("cuda") else 32,
                                           layers=[layers // 3, 2 * layers // 3])
    del module
    rows = check_targets(results)
    text = check_markdown(rows, results["device"])
    console.print(text, markup=False)
    stem = f"gpu_check_{args.device.split(':')[0]}_{preset}"
    (out / f"{stem}.json").write_text(json.dumps({"results": results, "targets": rows}, indent=2, default=str))
    (out / f"{stem}.md").write_text(text + "\n")
    missed = [f"{r['target']} {r['what']}: {r['value']:.3f} {r['unit']} (must be {'≥' if r.get('at_least') else '≤'} "
              f"{r['limit']:g})" for r in rows if r["ok"] is False]
    if missed:
        console.print("error: targets missed: " + "; ".join(missed), markup=False)
        return 1
    return 0


def _hub_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"revision": args.revision, "cache_dir": args.cache_dir, "download": not args.offline}


def cmd_fetch(args: argparse.Namespace) -> int:
    from .hub import fetch

    report = fetch(args.hub_id, args.revision, cache_dir=args.cache_dir)
    table = Table(title=f"{args.hub_id} text-only: {report.path}", show_header=False)
    share = report.bytes_text / report.bytes_snapshot if report.bytes_snapshot else 0.0
    for label, value in [
        ("commit", report.commit),
        ("fetched now", _gib(report.bytes_fetched) + (" (already cached)" if report.cached else "")
         + (f", resumed after {_gib(report.resumed_from)}" if report.resumed_from else "")),
        ("text-only checkpoint", f"{_gib(report.bytes_text)} = {share:.1%} of the full snapshot"),
        ("full snapshot", _gib(report.bytes_snapshot)),
        ("shards fetched whole", ", ".join(report.files_whole) or "-"),
        ("shards fetched as text byte ranges", ", ".join(report.files_ranged) or "-"),
        ("shards never requested (towers only)", ", ".join(report.files_skipped) or "-"),
    ]:
        table.add_row(label, str(value))
    console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(prog="g3n-probe", description="Gemma 3n interpretability, text-only, exact.")
    sub = parser.add_subparsers(dest="command", required=True)
    # A hub id as SOURCE is fetched text-only on first use (see `g3n_probe.hub`).
    hub = argparse.ArgumentParser(add_help=False)
    hub.add_argument("--revision", default=None, help="branch, tag or commit of a hub id (default: main)")
    hub.add_argument("--cache-dir", default=None, help="where fetched text-only checkpoints live "
                                                       "(default: $G3N_PROBE_CACHE/hub, ~/.cache/g3n_probe/hub)")
    where = argparse.ArgumentParser(add_help=False, parents=[hub])
    where.add_argument("--offline", action="store_true", help="use only cached checkpoints; never touch the network")

    fetch = sub.add_parser("fetch", parents=[hub], help="fetch a hub checkpoint text-only (only the bytes the text "
                                                        "path reads) and compare with the full snapshot")
    fetch.add_argument("hub_id", help="e.g. google/gemma-3n-E2B (gated: accept the license, then log in or set HF_TOKEN)")
    fetch.set_defaults(func=cmd_fetch)

    info = sub.add_parser("info", parents=[where], help="config, components (stored vs loaded) and layers of a checkpoint")
    info.add_argument("source", nargs="?", default=None, help="checkpoint directory or hub id (default: bundled)")
    info.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                      help="default: what g3n.load picks (bfloat16 on cuda, float32 on cpu)")
    info.add_argument("--device", default=None, choices=["cpu", "cuda"],
                      help="plan where every component would live (needs no GPU); default: what g3n.load picks")
    info.set_defaults(func=cmd_info)

    points = sub.add_parser("points", parents=[where], help="the intervention-point table, with concrete shapes")
    points.add_argument("source", nargs="?", default=None)
    points.add_argument("--batch", type=_positive_int, default=1)
    points.add_argument("--tokens", type=_positive_int, default=8)
    points.add_argument("--symbolic", action="store_true", help="symbolic shapes only, no checkpoint")
    points.set_defaults(func=cmd_points)

    demo = sub.add_parser("demo", parents=[where], help="trace a code prompt: logit lens through AltUp, PLE and AltUp ablations")
    demo.add_argument("--model", default=None, help="checkpoint directory or hub id (default: bundled)")
    demo.add_argument("--prompt", default=None)
    demo.add_argument("--out", default="g3n_probe_demo.png", help="where to save the plot")
    demo.set_defaults(func=cmd_demo)

    audit = sub.add_parser("audit", parents=[where], help="where transformers and Google's reference Gemma 3n compute differently")
    audit.add_argument("source", nargs="?", default=None)
    audit.add_argument("--prompt", action="append", default=[], help="inputs to check (repeatable)")
    audit.set_defaults(func=cmd_audit)

    bench = sub.add_parser("bench", help="memory and speed: stock vs g3n_probe, per-layer table on device vs host")
    bench.add_argument("--device", type=_device, default="cpu")
    bench.add_argument("--preset", default=None, choices=["tiny", "mid", "e2b", "e4b"],
                       help="default: tiny on cpu, e2b on cuda")
    bench.add_argument("--shapes", nargs="*", type=_shape, default=None, help="BxT shapes, e.g. 1x128 8x512 1x2048")
    bench.add_argument("--repeats", type=_positive_int, default=5)
    bench.add_argument("--leak-traces", type=_non_negative_int, default=500)
    bench.add_argument("--out", default="benchmarks/results")
    bench.add_argument("--check", action="store_true",
                       help="the GPU check: also write the synthetic checkpoint, time load-to-first-trace, and "
                            "fail (exit 1) on any missed target (see `make gpu-check`)")
    bench.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    global console
    console = _make_console()
    try:
        return args.func(args)
    except (OSError, ValueError, TypeError, KeyError, MemoryError) as error:
        # Bad input (a file, a checkpoint, an argument): the message names it; a traceback would not help.
        if os.environ.get("G3N_PROBE_DEBUG"):
            raise
        console.print(f"error: {error}", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())

