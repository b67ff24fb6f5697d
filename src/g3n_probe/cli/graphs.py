"""``g3n-probe attribute`` and ``g3n-probe graph serve``: attribution graphs from the command line.

    g3n-probe attribute --prompts FILE [--transcoders DIR] --out DIR [--model SOURCE]
        one pruned graph per line of FILE (default: the bundled model and its transcoders), saved as ``prompt-{i:04d}.json`` (+ ``graph-metadata.json``); under
        ``torchrun`` rank r of w takes the prompts i with i % w == r
    g3n-probe graph serve DIR [--port N]
        the saved graphs of DIR on http://127.0.0.1:N/ (the list, each graph's page, the JSON files)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console

from .._util import rank_world
from ..circuits import attribute
from ..circuits.serve import serve
from ..loading import load, resolve_source
from ..sae import default_transcoders
from ..sae.transcoders import load_transcoders


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]; got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0: any free port); got {value}")
    return value


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (a trailing newline ends a line; empty lines are refused, not skipped: they would
    shift every later prompt's number)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except IsADirectoryError:
        raise ValueError(f"--prompts {path}: a directory; expected a text file, one prompt per line") from None
    empty = [i for i, line in enumerate(lines) if not line.strip()]
    if not lines or empty:
        raise ValueError(f"--prompts {path}: " + ("no prompts" if not lines else f"line {empty[0] + 1} is empty"))
    return lines


def _rank_world() -> tuple[int, int]:
    """Under torchrun: a gloo group (used only for a final barrier), its rank and size; else (0, 1)."""
    rank, world = rank_world()
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo")
    return rank_world()


def _device(rank: int, world: int) -> Any:
    if world > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return None


def cmd_attribute(args: argparse.Namespace, console: Console, hub_options: dict[str, Any]) -> int:
    prompts = read_prompts(Path(args.prompts))
    if args.transcoders is None and args.model is not None:
        raise ValueError("--transcoders is required with --model (the bundled transcoders fit only the bundled "
                         "default model)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_world()
    model = load(resolve_source(args.model, **hub_options), device=_device(rank, world))
    # on the model's device, in float32 (attribution reads them in float32 wherever they are)
    transcoders = load_transcoders(args.transcoders or default_transcoders(), model, device=model.hf_model.device)
    mine = [i for i in range(len(prompts)) if i % world == rank]
    for i in mine:
        start = time.perf_counter()
        graph = attribute(model, prompts[i], transcoders, max_feature_nodes=args.max_feature_nodes,
                          batch_size=args.batch_size)
        pruned = graph.prune(node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
        path = pruned.save(out, f"prompt-{i:04d}")
        console.print(f"[rank {rank}/{world}] {path}: {pruned!r} ({time.perf_counter() - start:.1f} s)",
                      markup=False, highlight=False)
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        console.print(f"{len(prompts)} graphs in {out}; view them with `g3n-probe graph serve {out}`",
                      markup=False, highlight=False)
    return 0


def cmd_graph_serve(args: argparse.Namespace, console: Console) -> int:
    server = serve(args.directory, args.port)
    console.print(f"serving the graphs of {server.root} on {server.url} (127.0.0.1 only; Ctrl-C stops)",
                  markup=False, highlight=False)
    try:
        while server.thread is not None and server.thread.is_alive():
            server.thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return 0


def add_graph_commands(sub: Any, where: argparse.ArgumentParser, hub_options: Any) -> None:
    """The ``attribute`` and ``graph serve`` subcommands (``hub_options(args)``: the hub keywords of SOURCE)."""
    attr = sub.add_parser("attribute", parents=[where], help="one pruned attribution graph per prompt of a file "
                                                             "(split across ranks under torchrun)")
    attr.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    attr.add_argument("--transcoders", default=None, help="a transcoder directory (circuit-tracer's layout or "
                                                          "sparsify's); default: the bundled default's, with it")
    attr.add_argument("--out", required=True, help="where the graphs go: prompt-{i:04d}.json + graph-metadata.json")
    attr.add_argument("--model", default=None, help="checkpoint directory or hub id (default: bundled)")
    attr.add_argument("--node-threshold", type=_fraction, default=0.8)
    attr.add_argument("--edge-threshold", type=_fraction, default=0.98)
    attr.add_argument("--max-feature-nodes", type=_positive, default=None, help="default: every active feature")
    attr.add_argument("--batch-size", type=_positive, default=None, help="targets per backward pass "
                                                                         "(default: 64 on a GPU, 32 on a CPU)")
    attr.set_defaults(func=lambda args, console: cmd_attribute(args, console, hub_options(args)))
    graph = sub.add_parser("graph", help="saved attribution graphs")
    graph_sub = graph.add_subparsers(dest="graph_command", required=True)
    serve_cmd = graph_sub.add_parser("serve", help="serve a directory of saved graphs on 127.0.0.1 (viewer pages)")
    serve_cmd.add_argument("directory", help="a directory written by graph.save / g3n-probe attribute")
    serve_cmd.add_argument("--port", type=_port, default=8032, help="default 8032; 0: any free port")
    serve_cmd.set_defaults(func=cmd_graph_serve)
