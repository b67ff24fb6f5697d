"""The GPU check: every performance target, stock beside g3n_probe, in one run (``make gpu-check``).

Each target is a named record (`Target`): what it measures, its limit and its unit. `check_targets`
evaluates them on one run's figures, `check_markdown` renders the verdicts, and the README's list
of targets is rendered from the same records (`targets_markdown`). `run_gpu_check` writes the
synthetic checkpoint, measures the load (G5) and patching throughput (G6) on top of `bench.run_bench`'s
figures, writes ``gpu_check_<device>_<preset>.{json,md}`` and returns the missed targets.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..analysis import patching, patching_plan
from ..analysis.decompose import decompose
from ..checkpoint import module_tree
from ..checkpoint.reading import (
    by_file,
    is_text_key,
    read_exactly,
    tensor_bytes,
    tensor_offsets,
    weight_map,
)
from ..checkpoint.synthetic import build_tokenizer, random_model, save_checkpoint
from ..circuits import attribute
from ..loading import load
from ..points import BY_NAME
from ..probe.gemma3n_probe import Gemma3nProbe
from ..sae.transcoders import Transcoder
from .bench import median_time, rss, sync

GIB = 1024**3


@dataclass(frozen=True)
class Target:
    """One performance target: ``value <= limit`` (or ``>=`` with ``at_least``); no limit: reported only."""

    name: str
    what: str
    limit: float | None
    unit: str
    at_least: bool = False

    def judge(self, value: float, detail: str = "") -> dict[str, Any]:
        ok = None if self.limit is None else (value >= self.limit if self.at_least else value <= self.limit)
        return {"target": self.name, "what": self.what + (f", {detail}" if detail else ""), "value": value,
                "limit": self.limit, "unit": self.unit, "at_least": self.at_least, "ok": ok}

    def bound(self) -> str:
        return "" if self.limit is None else f"{'≥' if self.at_least else '≤'} {self.limit:g} {self.unit}"


RESIDENT = Target("G1", "resident accelerator memory after load", None, "GiB")
PEAK = Target("G2", "peak accelerator memory, B1×T2048 trace reading last-position logits (table on host)", 6.0, "GiB")
INJECTED = Target("G3", "injected, untouched / stock", 1.02, "×")
ALL_SAVED = Target("G3", "every point of every layer saved / stock", 1.10, "×")
HOST_TABLE = Target("G4", "table on the host / on the accelerator", 1.05, "×")
LOAD_TIME = Target("G5", "g3n.load call to the first finished trace", None, "s")
READ_TIME = Target("G5", "reading the text tensors' bytes alone", None, "s")
LOAD_MEMORY = Target("G5", "host memory the load added (peak RSS − RSS before) / (per-layer table + 1 GiB)", 1.0, "×")
SWEEP = Target("G6", "patches/s, patching sweep / one stock forward per patch with a plain torch hook", 20.0, "×",
               at_least=True)
DECOMPOSE = Target("G7", "g3n.decompose of a logit difference at every position / a traced forward, time", 3.0, "×")
GRAPH_TIME = Target("G8", "g3n.attribute, T64, 16k-latent transcoders at every layer (7500 feature nodes), seconds",
                    60.0, "s")
GRAPH_MEMORY = Target("G8", "g3n.attribute as above, peak accelerator memory", 24.0, "GiB")
GRAPH_BATCHING = Target("G8", "g3n.attribute, batched backward passes / one backward pass per target row, speed-up",
                        10.0, "×", at_least=True)
TARGETS = (RESIDENT, PEAK, INJECTED, ALL_SAVED, HOST_TABLE, LOAD_TIME, READ_TIME, LOAD_MEMORY, SWEEP, DECOMPOSE,
           GRAPH_TIME, GRAPH_MEMORY, GRAPH_BATCHING)


def targets_markdown() -> str:
    """The targets as a README list."""
    return "\n".join(f"- {t.name}: {t.what}" + (f" {t.bound()}" if t.limit is not None else " (reported)")
                     for t in TARGETS)


def check_targets(results: dict) -> list[dict[str, Any]]:
    """Every target evaluated on `bench.run_bench`'s results (plus ``load`` and ``patching``). Missing
    measurements (a shape not run, no device memory on CPU) are skipped."""
    variants = results["variants"]
    stock = variants.get("stock_text", {}).get("shapes", {})
    on_device = variants.get("g3n_table_device", {}).get("shapes", {})
    on_host = variants.get("g3n_table_host", {}).get("shapes", {})
    rows = [RESIDENT.judge(entry["resident_device_bytes"] / GIB, name) for name, entry in variants.items()
            if entry.get("resident_device_bytes") is not None]
    peak = on_host.get("1x2048", {}).get("trace_peak_device_bytes")
    rows += [PEAK.judge(peak / GIB)] if peak is not None else []
    for shape in ("1x128", "8x512"):
        if shape in stock and shape in on_device:
            base = stock[shape]["forward_seconds"]
            rows.append(INJECTED.judge(on_device[shape]["forward_seconds"] / base, shape))
            if "trace_all_seconds" in on_device[shape]:
                rows.append(ALL_SAVED.judge(on_device[shape]["trace_all_seconds"] / base, shape))
        if shape in on_host and shape in on_device:
            rows.append(HOST_TABLE.judge(on_host[shape]["forward_seconds"] / on_device[shape]["forward_seconds"], shape))
    load_figures = results.get("load", {})
    for target, key in ((LOAD_TIME, "load_to_first_trace_seconds"), (READ_TIME, "text_bytes_read_seconds")):
        if key in load_figures:
            rows.append(target.judge(load_figures[key]))
    if "patching" in results:
        figures = results["patching"]
        rows.append(SWEEP.judge(figures["speedup"], f"{figures['chunk']} per forward, B1×T{figures['tokens']}"))
    if "decompose" in results:
        figures = results["decompose"]
        rows.append(DECOMPOSE.judge(figures["time_ratio"], f"B1×T{figures['tokens']}"))
    if "graph" in results:
        figures = results["graph"]
        shape = f"T{figures['tokens']}, {figures['width']} latents, {figures['features']} feature nodes"
        rows.append(GRAPH_TIME.judge(figures["seconds"], shape))
        if figures["peak_bytes"]:
            rows.append(GRAPH_MEMORY.judge(figures["peak_bytes"] / GIB, shape))
        rows.append(GRAPH_BATCHING.judge(figures["batching_speedup"], f"the same {figures['rows_compared']} rows"))
    if "host_rss_added_bytes" in load_figures:
        rows.append(LOAD_MEMORY.judge(load_figures["host_rss_added_bytes"] / (load_figures["host_table_bytes"] + GIB)))
    return rows


class PeakRSS:
    """The highest RSS seen while the block runs, sampled every 5 ms from another thread (Linux)."""

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def measure_load(checkpoint: Path, device: str) -> dict[str, float]:
    """G5: from the `g3n_probe.load` call to the first finished trace, and the time to read the text bytes."""
    # The checkpoint was just written: flush it and drop it from the page cache, so both timings below
    # read from the disk, as a first load of downloaded weights does.
    os.sync()
    for path in checkpoint.glob("*.safetensors"):
        if hasattr(os, "posix_fadvise"):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    text_bytes = 0
    start = time.perf_counter()
    mapping = weight_map(checkpoint)
    buffer = torch.empty(16 * 1024**2, dtype=torch.uint8).numpy()
    for filename, keys in by_file(mapping, [key for key in mapping if is_text_key(key)]).items():
        path = checkpoint / filename
        offsets = tensor_offsets(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            for key in keys:
                stored, shape, first = offsets[key]
                size = tensor_bytes(offsets[key])
                for done in range(0, size, len(buffer)):
                    read_exactly(fd, first + done, buffer[: min(len(buffer), size - done)], path)
                text_bytes += size
        finally:
            os.close(fd)
    read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with PeakRSS() as rss:
        model = load(checkpoint, device=device)
    table = module_tree.per_layer_table(model.hf_model).weight
    table_bytes = table.numel() * table.element_size() if table.device.type == "cpu" else 0
    del table
    ids = torch.randint(3, model.text_config.vocab_size_per_layer_input, (1, 16), device=device)
    with torch.no_grad(), model.trace(ids, logits_to_keep=1):
        model.logits.output.save()
    sync(torch.device(device))
    seconds = time.perf_counter() - start
    del model
    result = {"load_to_first_trace_seconds": seconds, "text_bytes_read_seconds": read_seconds, "text_bytes": text_bytes}
    if torch.device(device).type != "cpu":   # on the host the whole model is host memory, as it should be
        result.update(host_rss_added_bytes=rss.peak - rss.before, host_table_bytes=table_bytes)
    return result


def _resid_mid_hooks(stock: torch.nn.Module, clean: torch.Tensor, layers: list[int]) -> tuple[list, dict]:
    """The stock decoder layers, and the clean prompt's resid_mid at ``layers`` read with plain forward
    pre-hooks on ``pre_feedforward_layernorm`` (its input is resid_mid), from one stock forward."""
    decoders = module_tree.text_model(stock).layers
    kept: dict[int, torch.Tensor] = {}
    handles = [decoders[layer].pre_feedforward_layernorm.register_forward_pre_hook(
        lambda module, args, layer=layer: kept.__setitem__(layer, args[0].detach().clone())) for layer in layers]
    try:
        with torch.no_grad():
            stock(input_ids=clean, attention_mask=torch.ones_like(clean), logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return decoders, kept


def _patching_ways(model: Any, stock: torch.nn.Module, clean: torch.Tensor, corrupted: torch.Tensor,
                   layers: list[int], chunk: int, metric: Callable) -> dict[str, Callable[[], tuple[int, float]]]:
    """The four ways of G6, each a callable doing every patch and returning (forwards, work done as a fraction
    of one whole forward per patch)."""
    device = next(stock.parameters()).device
    tokens = clean.shape[1]
    variants = [(layer, "resid_mid", position) for layer in layers for position in range(tokens)]
    source = model.cache(clean, ["resid_mid"], layers=layers, verbose=False)
    decoders, stock_source = _resid_mid_hooks(stock, clean.to(device), layers)
    ids = corrupted.to(device)

    def plain_hooks() -> tuple[int, float]:   # what a user writes without g3n_probe
        for layer, _, position in variants:
            def write(module: Any, args: tuple, layer: int = layer, position: int = position) -> None:
                args[0][:, position] = stock_source[layer][:, position]   # in place: the MLP and the residual add
            handle = decoders[layer].pre_feedforward_layernorm.register_forward_pre_hook(write)
            try:
                with torch.no_grad():
                    metric(stock(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits)
            finally:
                handle.remove()
        return len(variants), 1.0

    def one_per_trace() -> tuple[int, float]:
        for variant in variants:
            patching.patched_metric(model, corrupted, [variant], source, BY_NAME, metric, logits_to_keep=1)
        return len(variants), 1.0

    def sweep(reuse: str) -> Callable[[], tuple[int, float]]:
        def run() -> tuple[int, float]:
            result = patching.sweep(model, clean, corrupted, metric, layers=layers, chunk=chunk, logits_to_keep=1,
                                    reuse=reuse)
            return result.forwards, result.work
        return run

    return {"plain_hooks": plain_hooks, "one_per_trace": one_per_trace, "sweep_layers": sweep("layers"),
            "sweep": sweep("tokens")}


def measure_patching(model: Any, tokens: int, chunk: int, layers: list[int] | None = None, rounds: int = 1,
                     stock: torch.nn.Module | None = None) -> dict[str, Any]:
    """G6: patches per second on the same patches, four ways: (a) ``plain_hooks``, one forward per patch of a
    stock model with a plain torch hook (``stock``, else the module the probe wraps, called outside any trace:
    its points idle, G3 bounds them); (b) ``one_per_trace``, a loop of one-patch traces; (c) ``sweep_layers``,
    `patching.sweep` reusing the target's layers only; (d) ``sweep``, reusing its layers and its keys and
    values (token reuse). The patches: ``resid_mid`` at ``layers`` (default all) × every position of a random
    B1×T prompt pair whose middle token differs, with a last-position logit difference (``logits_to_keep=1``).
    The ways run interleaved, ``rounds`` times, each figure the median round; a sweep's time includes its
    set-up (the source cache and the baseline forwards). ``work``: layer-positions computed, as a fraction of
    one whole forward per patch; ``floor``: Σ (L − l)(T − p) / (L·T) over the patches, the least any way needs.
    ``speedup`` is (d) over (a)."""
    vocab = model.text_config.vocab_size_per_layer_input
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(3, vocab, (1, tokens), generator=generator)
    corrupted = clean.clone()
    corrupted[0, tokens // 2] = (corrupted[0, tokens // 2] + 1) % vocab

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 7] - logits[:, -1, 8]

    count = model.text_config.num_hidden_layers
    layers = list(range(count)) if layers is None else layers
    stock = model.hf_model if stock is None else stock
    ways = _patching_ways(model, stock, clean, corrupted, layers, chunk, metric)
    device = next(stock.parameters()).device
    patching.sweep(model, clean, corrupted, metric, layers=layers[:1], positions=[0, 1], chunk=chunk,
                   logits_to_keep=1)   # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    done: dict[str, tuple[int, float]] = {}
    for _ in range(rounds):
        for name, run in ways.items():
            sync(device)
            start = time.perf_counter()
            done[name] = run()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    patches = len(layers) * tokens
    results: dict[str, Any] = {"tokens": tokens, "layers": layers, "chunk": chunk, "rounds": rounds,
                               "floor": patching_plan.work_floor([(layer, position) for layer in layers
                                                                  for position in range(tokens)], count, tokens)}
    for name, times in seconds.items():
        median = sorted(times)[len(times) // 2]
        results[name] = {"seconds": median, "rounds_seconds": times, "patches": patches,
                         "patches_per_second": patches / median, "forwards": done[name][0], "work": done[name][1]}
    rate = {name: results[name]["patches_per_second"] for name in ways}
    results.update(speedup=rate["sweep"] / rate["plain_hooks"], speedup_vs_traces=rate["sweep"] / rate["one_per_trace"],
                   speedup_layers=rate["sweep_layers"] / rate["plain_hooks"])
    return results


def measure_decompose(model: Any, tokens: int, repeats: int, measure: Callable | None = None) -> dict[str, Any]:
    """G7: `decompose.decompose` of a logit difference at every position of a random B1×T prompt against
    one trace saving the logits, on the same model; ``measure(fn, device, repeats)`` -> (seconds, peak
    bytes), by default `bench.median_time` (peak device memory on CUDA; benchmarks/decompose_bench.py
    passes one that also samples RSS)."""
    measure = measure or (lambda fn, device, repeats: median_time(fn, device, repeats, warmup=1))
    vocab = model.text_config.vocab_size_per_layer_input
    ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    device = next(model.hf_model.parameters()).device

    def trace() -> None:
        with torch.no_grad(), model.trace(ids):
            model.logits.output.save()

    result = {}
    for way, fn in (("trace", trace), ("decompose", lambda: decompose(model, ids, (7, 8)))):
        seconds, peak = measure(fn, device, repeats)
        result[way] = {"seconds": seconds, "peak_bytes": peak or 0}   # no peak figure on CPU from median_time
    result.update(tokens=tokens, components=1 + 4 * model.text_config.num_hidden_layers,
                  time_ratio=result["decompose"]["seconds"] / result["trace"]["seconds"],
                  memory_ratio=result["decompose"]["peak_bytes"] / max(result["trace"]["peak_bytes"], 1))
    return result


def measure_graph(model: Any, tokens: int, width: int, k: int, max_feature_nodes: int) -> dict[str, Any]:
    """G8: one `g3n.attribute` of a random prompt with random TopK transcoders (``width`` latents, ``k`` active)
    at every layer, keeping ``max_feature_nodes`` features: seconds and peak device memory (0 on CPU)."""
    config = model.text_config
    device = next(model.hf_model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    d = config.hidden_size
    transcoders = {layer: Transcoder(torch.randn(width, d, generator=gen) / d ** 0.5,
                                     torch.randn(width, d, generator=gen) * 0.02, torch.zeros(width), torch.zeros(d),
                                     k=k, layer=layer).to(device) for layer in range(config.num_hidden_layers)}
    ids = torch.randint(3, config.vocab_size_per_layer_input, (1, tokens), generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    graph = attribute(model, ids, transcoders, max_feature_nodes=max_feature_nodes)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    timed = {}
    for batch in (None, 1):   # the same rows (256 feature nodes and the logits), batched vs one per backward pass
        start = time.perf_counter()
        small = attribute(model, ids, transcoders, max_feature_nodes=256, batch_size=batch)
        sync(device)
        timed[batch] = time.perf_counter() - start
    return {"tokens": tokens, "width": width, "k": k, "features": len(graph.of_kind("feature")), "seconds": seconds,
            "peak_bytes": peak, "batching_speedup": timed[1] / timed[None],
            "rows_compared": len(small.of_kind("feature")) + len(small.of_kind("logit"))}


def check_markdown(rows: list[dict[str, Any]], device_name: str) -> str:
    lines = [f"GPU check on {device_name}", "", "| target | what | measured | limit | |", "|---|---|---|---|---|"]
    for row in rows:
        limit = "" if row["limit"] is None else f"{'≥' if row.get('at_least') else '≤'} {row['limit']:g} {row['unit']}"
        verdict = "" if row["ok"] is None else ("ok" if row["ok"] else "**missed**")
        lines.append(f"| {row['target']} | {row['what']} | {row['value']:.3f} {row['unit']} | {limit} | {verdict} |")
    return "\n".join(lines)


def run_gpu_check(preset: str, device: str, out: Path, results: dict, print_fn: Callable = print) -> list[str]:
    """The rest of the GPU check on top of `bench.run_bench`'s ``results``: writes the synthetic checkpoint
    and measures G5 on it, measures G6 and G7, evaluates every target, writes gpu_check_<device>_<preset>.{json,md};
    returns the missed targets (empty: all met)."""
    scratch = Path(tempfile.mkdtemp(prefix="g3n_gpu_check_"))
    try:
        print_fn(f"writing the synthetic {preset} checkpoint to {scratch} ...")
        results["load"] = measure_load(save_checkpoint(scratch / preset, preset), device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_fn("patching: sweep vs one trace per patch ...")
    on_gpu = device.startswith("cuda")
    module = random_model(preset, device=device, dtype=torch.bfloat16 if on_gpu else torch.float32)
    layers = module.config.get_text_config().num_hidden_layers
    # Two layers × every position keeps the one-trace-per-patch side to a few hundred traces. Both lie before
    # the trailing KV-reuse layers, where a last-position metric lets most patches cost no forward at all
    # (that would flatter G6).
    probe = Gemma3nProbe(module, tokenizer=build_tokenizer(module.config))
    before_reuse = min(module_tree.kv_sources(module.config.get_text_config()), default=layers)
    results["patching"] = measure_patching(probe, tokens=128 if on_gpu else 16, chunk=64 if on_gpu else 32,
                                           layers=[before_reuse // 3, 2 * before_reuse // 3])
    print_fn("decompose: g3n.decompose vs a traced forward ...")
    results["decompose"] = measure_decompose(probe, tokens=512 if on_gpu else 64, repeats=3)
    print_fn("attribution graph: g3n.attribute with transcoders at every layer ...")
    results["graph"] = measure_graph(probe, tokens=64 if on_gpu else 16, width=16384 if on_gpu else 256,
                                     k=32 if on_gpu else 8, max_feature_nodes=7500 if on_gpu else 200)
    del module, probe
    rows = check_targets(results)
    text = check_markdown(rows, results["device"])
    print_fn(text)
    stem = f"gpu_check_{device.split(':')[0]}_{preset}"
    (out / f"{stem}.json").write_text(json.dumps({"results": results, "targets": rows}, indent=2, default=str))
    (out / f"{stem}.md").write_text(text + "\n")
    return [f"{r['target']} {r['what']}: {r['value']:.3f} {r['unit']} (must be {'≥' if r['at_least'] else '≤'} "
            f"{r['limit']:g})" for r in rows if r["ok"] is False]
