"""``g3n-probe``: fetch, info, points, demo, audit, bench — presentation over the package's own functions.

    g3n-probe fetch HUB_ID         fetch a hub checkpoint text-only (only the bytes the text path reads)
    g3n-probe info [SOURCE]        config, components (stored vs loaded), layers
    g3n-probe points [SOURCE]      the intervention-point table with this checkpoint's shapes
    g3n-probe demo [--model SRC]   trace a code prompt, logit lens through the AltUp merge, ablations
    g3n-probe bench [--device cuda] memory and speed, per-layer table on the device vs the host
    g3n-probe audit [SOURCE] [--prompt TEXT ...]  where transformers and Google's reference differ
    g3n-probe attribute --prompts FILE [--transcoders DIR] --out DIR  one attribution graph per prompt
    g3n-probe graph serve DIR [--port N]  saved graphs in a browser (127.0.0.1 only)
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from ..analysis.audit import audit
from ..checkpoint import module_tree
from ..checkpoint.reading import COMPONENTS, read_config, stored_components
from ..checkpoint.towers import TowerNotLoadedError
from ..hub.fetching import fetch
from ..loading import footprint, load, resolve_device, resolve_dtype, resolve_source
from ..points import listing
from .bench import run_bench
from .demo import run_demo
from .gpu_check import run_gpu_check
from .graphs import add_graph_commands

#: What the CLI reports as ``error: …`` with exit 2: the project's own errors about its input (bad
#: checkpoints, files, arguments, hub answers). Anything else (a TypeError, a KeyError) is a bug and
#: shows its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ConnectionError,
               TowerNotLoadedError, MemoryError)

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
    """`loading.resolve_device`'s check, as argparse's error (the message names the device and the choices)."""
    try:
        resolve_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("device=", "", 1)) from None
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


def make_console() -> Console:
    """Wide tables stay readable in logs and notebooks, where there is no terminal width to fit."""
    return Console(width=None if sys.stdout.isatty() else 200)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 1024**3:.3f} GiB" if nbytes >= 1024**3 / 100 else f"{nbytes / 1024**2:.2f} MiB"


def layer_rows(config: Any) -> list[dict[str, Any]]:
    text = config.get_text_config()
    modes, sources = text.kv_sharing_modes, module_tree.kv_sources(text)
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


def cmd_info(args: argparse.Namespace, console: Console) -> int:
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
    _print_components(console, args, directory, config)
    layers = Table(title="Layers")
    for column in ("layer", "attention", "KV", "reads K/V of", "sparsity", "FFN width"):
        layers.add_column(column)
    for row in layer_rows(config):
        layers.add_row(str(row["layer"]), row["attention"], row["kv"],
                       "" if row["kv_source"] is None else str(row["kv_source"]),
                       f"{row['sparsity']:.2f}" if row["sparsity"] else "dense", str(row["ffn"]))
    console.print(layers)
    return 0


def _print_components(console: Console, args: argparse.Namespace, directory: Path, config: Any) -> None:
    """Stored against loaded, per component, and where each would live."""
    stored = stored_components(directory)
    device = torch.device(args.device) if args.device else resolve_device(None)
    dtype = resolve_dtype(args.dtype, device)  # what g3n.load would pick for this device
    plan = footprint(config, device=device, dtype=dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    components = Table(title=f"Components (loaded = what g3n.load(device={device.type!r}) allocates, {dtype_name}, and where)")
    for column in ("component", "stored params", "stored bytes", "loaded params", "loaded bytes", "lives on"):
        components.add_column(column, justify="right" if column not in ("component", "lives on") else "left")
    for name in COMPONENTS:
        on_disk, loaded = stored[name], plan[name]
        note = f" ({on_disk['absent']} tensors' shards absent)" if on_disk["absent"] else ""
        where = loaded["where"] if loaded["params"] else "not loaded" if on_disk["params"] else ""
        components.add_row(name, f"{on_disk['params']:,}{note}", _gib(on_disk["bytes"]), f"{loaded['params']:,}",
                           _gib(loaded["bytes"]), where)
    console.print(components)
    if all(s["absent"] and not s["params"] for s in stored.values() if s["absent"] or s["params"]):
        console.print(f"weights not fetched (config only): `g3n-probe fetch {args.source}` fetches the text-only "
                      "checkpoint", markup=False)
    totals = {where: sum(c["bytes"] for c in plan.values() if c["where"] == where) for where in ("accelerator", "host")}
    console.print(f"on the accelerator: {_gib(totals['accelerator'])}; on the host: {_gib(totals['host'])} "
                  "(parameters and buffers; activations and the KV cache come on top)")


def cmd_points(args: argparse.Namespace, console: Console) -> int:
    config = (read_config(resolve_source(args.source, **_hub_options(args), config_only=True))
              if args.source or not args.symbolic else None)
    table = Table(title="Intervention points, all writable (inside one trace, access them in this order)")
    for column in ("where", "name", "shape", "value", "produced at"):
        table.add_column(column)
    for row in listing(config, args.batch, args.tokens):
        table.add_row(*row)
    console.print(table)
    if config is not None:
        rows = layer_rows(config)
        reuse = [f"{r['layer']}←{r['kv_source']}" for r in rows if r["kv_source"] is not None]
        if reuse:
            console.print(f"KV sharing (layer←layer whose K/V it reads): {', '.join(reuse)}")
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    out = Path(args.out)
    _writable_directory(out.parent if str(out.parent) else Path("."))
    run_demo(args.model, out=out, prompt=args.prompt, console=console, load_options=_hub_options(args))
    return 0


def cmd_audit(args: argparse.Namespace, console: Console) -> int:
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


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    preset = args.preset or ("e2b" if args.device.startswith("cuda") else "tiny")
    out = _writable_directory(Path(args.out))
    results = run_bench(preset, device=args.device, shapes=args.shapes or None, repeats=args.repeats,
                        leak_traces=args.leak_traces, out_dir=out, print_fn=console.print)
    if not args.check:
        return 0
    missed = run_gpu_check(preset, args.device, out, results, print_fn=lambda text: console.print(text, markup=False))
    if missed:
        console.print("error: targets missed: " + "; ".join(missed), markup=False)
        return 1
    return 0


def _hub_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"revision": args.revision, "cache_dir": args.cache_dir, "download": not args.offline}


def cmd_fetch(args: argparse.Namespace, console: Console) -> int:
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


def _source_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Options shared by every command taking a SOURCE: a hub id is fetched text-only on first use."""
    hub = argparse.ArgumentParser(add_help=False)
    hub.add_argument("--revision", default=None, help="branch, tag or commit of a hub id (default: main)")
    hub.add_argument("--cache-dir", default=None, help="where fetched text-only checkpoints live "
                                                       "(default: $G3N_PROBE_CACHE/hub, ~/.cache/g3n_probe/hub)")
    where = argparse.ArgumentParser(add_help=False, parents=[hub])
    where.add_argument("--offline", action="store_true", help="use only cached checkpoints; never touch the network")
    return hub, where


def _add_inspection_commands(sub: Any, hub: argparse.ArgumentParser, where: argparse.ArgumentParser) -> None:
    fetch_cmd = sub.add_parser("fetch", parents=[hub], help="fetch a hub checkpoint text-only (only the bytes the "
                                                            "text path reads) and compare with the full snapshot")
    fetch_cmd.add_argument("hub_id", help="e.g. google/gemma-3n-E2B (gated: accept the license, then log in or set HF_TOKEN)")
    fetch_cmd.set_defaults(func=cmd_fetch)
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


def _add_running_commands(sub: Any, where: argparse.ArgumentParser) -> None:
    demo = sub.add_parser("demo", parents=[where], help="trace a code prompt: logit lens through AltUp, PLE and AltUp ablations")
    demo.add_argument("--model", default=None, help="checkpoint directory or hub id (default: bundled)")
    demo.add_argument("--prompt", default=None)
    demo.add_argument("--out", default="g3n_probe_demo.png", help="where to save the plot")
    demo.set_defaults(func=cmd_demo)
    audit_cmd = sub.add_parser("audit", parents=[where], help="where transformers and Google's reference Gemma 3n compute differently")
    audit_cmd.add_argument("source", nargs="?", default=None)
    audit_cmd.add_argument("--prompt", action="append", default=[], help="inputs to check (repeatable)")
    audit_cmd.set_defaults(func=cmd_audit)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g3n-probe", description="Gemma 3n interpretability, text-only, exact.")
    parser.add_argument("--version", action="version", version=f"g3n-probe {version('g3n_probe')}")
    sub = parser.add_subparsers(dest="command", required=True)
    hub, where = _source_parsers()
    _add_inspection_commands(sub, hub, where)
    _add_running_commands(sub, where)
    add_graph_commands(sub, where, _hub_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    args = build_parser().parse_args(argv)
    console = make_console()
    try:
        return args.func(args, console)
    except USER_ERRORS as error:
        # Bad input (a file, a checkpoint, an argument): the message names it; a traceback would not help.
        if os.environ.get("G3N_PROBE_DEBUG"):
            raise
        console.print(f"error: {error}", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
