"""``g3n-probe bench``: memory and speed of the per-layer-table placements, side by side.

Variants, each built with random weights directly in memory, measured one after another in the
same process (one model resident at a time):

* ``stock_multimodal``   stock with real towers (only when timm is installed);
* ``stock_text``         stock with the towers stubbed, everything on the device;
* ``g3n_table_device``   g3n_probe, points injected, per-layer table on the device;
* ``g3n_table_host``     g3n_probe, per-layer table in host memory (`g3n_probe.ple`).

Figures: resident device memory after load; for each shape, peak device memory and the median
forward time with last-position logits (``logits_to_keep=1``, no KV cache); for the g3n variants
also a trace saving nothing and a trace saving every point; host RSS; and a leak check (N traces
with saves and writes: device memory and RSS after trace N/10 and after trace N).

On CPU it runs the small presets so it fits a CI-sized budget; ``--device cuda`` runs the real
E2B/E4B shapes. Results go to ``benchmarks/results/bench_<device>_<preset>.{json,md}``.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import arch


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> tuple[float, int | None]:
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), peak


def trace_every_point(probe: Any, ids: torch.Tensor, **trace_kwargs: Any) -> None:
    """One trace that saves every point of every layer (and the layer stacks), in table order."""
    from .points import AFTER_LAYERS, BEFORE_LAYERS, LAYER_POINTS

    names = [p.name for p in LAYER_POINTS if probe.injection.unavailable(p) is None]
    with torch.no_grad(), probe.trace(ids, **trace_kwargs):
        for point in BEFORE_LAYERS:
            getattr(probe, point.name).output.save()
        for i in range(probe.text_config.num_hidden_layers):
            probe.layers[i].input.save()
            for name in names:
                getattr(probe.layers[i], name).output.save()
            probe.layers[i].output.save()
        for point in AFTER_LAYERS:
            if probe.injection.unavailable(point) is None:
                getattr(probe, point.name).output.save()


def _build(variant: str, preset: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(module, probe or None) for one variant."""
    from .ple import host_resident, move_except_table
    from .probe import Gemma3nProbe
    from .synthetic import build_tokenizer, preset_config, random_model

    if variant == "stock_multimodal":
        from transformers import Gemma3nForConditionalGeneration

        config = preset_config(preset)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                module = Gemma3nForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
        return module.eval(), None
    if variant == "g3n_table_host":
        module = random_model(preset, device="cpu", dtype=dtype)
        move_except_table(module, device)
        host_resident(arch.per_layer_table(module), device)
    else:
        module = random_model(preset, device=device, dtype=dtype)
    if variant == "stock_text":
        return module, None
    return module, Gemma3nProbe(module, tokenizer=build_tokenizer(module.config))


def run_bench(preset: str, device: str = "cpu", shapes: list[tuple[int, int]] | None = None, repeats: int = 5,
              warmup: int = 2, leak_traces: int = 500, out_dir: Path | None = None, print_fn: Callable = print) -> dict:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = shapes or ([(1, 128), (8, 512), (1, 2048)] if dev.type == "cuda" else [(1, 32), (4, 128), (1, 512)])
    variants = ["stock_text", "g3n_table_device", "g3n_table_host"]
    if importlib.util.find_spec("timm") is not None:
        variants.insert(0, "stock_multimodal")
    results: dict[str, Any] = {"preset": preset, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
                               "dtype": str(dtype), "variants": {}}
    for variant in variants:
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rss_before = _rss()
        start = time.perf_counter()
        module, probe = _build(variant, preset, dev, dtype)
        _sync(dev)
        entry: dict[str, Any] = {
            "build_seconds": time.perf_counter() - start,
            "resident_device_bytes": _device_bytes(dev),
            "host_rss_bytes": _rss(), "host_rss_growth_bytes": _rss() - rss_before, "shapes": {},
        }
        text = module.config.get_text_config()
        for batch, tokens in shapes:
            ids = torch.randint(3, text.vocab_size_per_layer_input, (batch, tokens), device=dev)
            mask = torch.ones_like(ids)

            def forward() -> None:
                with torch.no_grad():
                    module(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

            seconds, peak = median_time(forward, dev, repeats, warmup)
            shape_entry = {"forward_seconds": seconds, "forward_peak_device_bytes": peak}
            if probe is not None:
                def trace() -> None:
                    with torch.no_grad(), probe.trace(ids, logits_to_keep=1):
                        probe.logits.output.save()

                def trace_all() -> None:
                    trace_every_point(probe, ids, logits_to_keep=1)

                shape_entry["trace_seconds"], shape_entry["trace_peak_device_bytes"] = median_time(trace, dev, repeats, 1)
                shape_entry["trace_all_seconds"], shape_entry["trace_all_peak_device_bytes"] = median_time(
                    trace_all, dev, max(1, repeats // 2), 1)
            entry["shapes"][f"{batch}x{tokens}"] = shape_entry
            print_fn(json.dumps({"variant": variant, "shape": f"{batch}x{tokens}", **shape_entry}))
        if probe is not None and variant == "g3n_table_host" and leak_traces:
            entry["leak_check"] = _leak_check(probe, dev, text, leak_traces)
            print_fn(json.dumps({"variant": variant, "leak_check": entry["leak_check"]}))
        results["variants"][variant] = entry
        del module, probe
    results["markdown"] = _markdown(results)
    print_fn(results["markdown"])
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"bench_{dev.type}_{preset}"
        (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
        (out_dir / f"{stem}.md").write_text(results["markdown"] + "\n")
    return results


def _leak_check(probe: Any, device: torch.device, text: Any, traces: int) -> dict:
    ids = torch.randint(3, text.vocab_size_per_layer_input, (1, 16), device=device)
    marks: dict[str, Any] = {}
    checkpoint = max(1, traces // 10)
    for n in range(1, traces + 1):
        with torch.no_grad(), probe.trace(ids, logits_to_keep=1):
            probe.ple_tokens.output.save()
            probe.layers[0].altup_predict.output.save()
            probe.layers[1].ple_out.output[:] = 0
            probe.logits.output.save()
        if n in (checkpoint, traces):
            gc.collect()
            _sync(device)
            marks[f"after_{n}"] = {"device_bytes": _device_bytes(device), "host_rss_bytes": _rss()}
    return marks


def _fmt_bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024**3:.3f} GiB"


def _markdown(results: dict) -> str:
    variants = results["variants"]
    lines = [f"{results['device']}, {results['dtype']}, preset {results['preset']}", "",
             "| variant | resident device memory | host RSS | build (s) |", "|---|---|---|---|"]
    for name, entry in variants.items():
        lines.append(f"| {name} | {_fmt_bytes(entry['resident_device_bytes'])} | {_fmt_bytes(entry['host_rss_bytes'])} | "
                     f"{entry['build_seconds']:.1f} |")
    lines += ["", "| variant | B×T | forward (ms) | vs stock_text | peak device | trace (ms) | trace, all saved (ms) |",
              "|---|---|---|---|---|---|---|"]
    base = variants.get("stock_text", {}).get("shapes", {})
    for name, entry in variants.items():
        for shape, s in entry["shapes"].items():
            ratio = s["forward_seconds"] / base[shape]["forward_seconds"] if shape in base else float("nan")
            trace = f"{s['trace_seconds'] * 1e3:.2f}" if "trace_seconds" in s else "-"
            trace_all = f"{s['trace_all_seconds'] * 1e3:.2f}" if "trace_all_seconds" in s else "-"
            lines.append(f"| {name} | {shape} | {s['forward_seconds'] * 1e3:.2f} | {ratio:.3f}× | "
                         f"{_fmt_bytes(s['forward_peak_device_bytes'])} | {trace} | {trace_all} |")
    for name, entry in variants.items():
        if "leak_check" in entry:
            marks = entry["leak_check"]
            keys = list(marks)
            lines += ["", f"Leak check ({name}): " + "; ".join(
                f"{k}: device {_fmt_bytes(v['device_bytes'])}, RSS {_fmt_bytes(v['host_rss_bytes'])}" for k, v in marks.items())]
            first, last = marks[keys[0]], marks[keys[-1]]
            lines.append(f"RSS growth {keys[0]} → {keys[-1]}: {(last['host_rss_bytes'] - first['host_rss_bytes']) / 1024**2:.1f} MiB")
    return "\n".join(lines)


# ---- the GPU check: every performance target, stock beside g3n_probe, in one run ----------------------

GIB = 1024**3


def check_targets(results: dict) -> list[dict[str, Any]]:
    """The targets of the GPU check, evaluated on `run_bench`'s results (rows with ``ok``; G1 and G5 are
    reported without a target). Missing measurements (a shape not run, no device memory on CPU) are skipped."""
    variants = results["variants"]
    stock = variants.get("stock_text", {}).get("shapes", {})
    on_device = variants.get("g3n_table_device", {}).get("shapes", {})
    on_host = variants.get("g3n_table_host", {}).get("shapes", {})
    rows: list[dict[str, Any]] = []

    def add(target: str, what: str, value: float | None, limit: float | None, unit: str, at_least: bool = False) -> None:
        if value is not None:
            ok = None if limit is None else (value >= limit if at_least else value <= limit)
            rows.append({"target": target, "what": what, "value": value, "limit": limit, "unit": unit,
                         "at_least": at_least, "ok": ok})

    for name, entry in variants.items():
        resident = entry.get("resident_device_bytes")
        add("G1", f"resident accelerator memory after load: {name}", None if resident is None else resident / GIB,
            None, "GiB")
    peak = on_host.get("1x2048", {}).get("trace_peak_device_bytes")
    add("G2", "peak accelerator memory, B1×T2048 trace reading last-position logits (table on host)",
        None if peak is None else peak / GIB, 6.0, "GiB")
    for shape in ("1x128", "8x512"):
        if shape in stock and shape in on_device:
            base = stock[shape]["forward_seconds"]
            add("G3", f"injected, untouched / stock, {shape}", on_device[shape]["forward_seconds"] / base, 1.02, "×")
            if "trace_all_seconds" in on_device[shape]:
                add("G3", f"every point of every layer saved / stock, {shape}",
                    on_device[shape]["trace_all_seconds"] / base, 1.10, "×")
        if shape in on_host and shape in on_device:
            add("G4", f"table on the host / on the accelerator, {shape}",
                on_host[shape]["forward_seconds"] / on_device[shape]["forward_seconds"], 1.05, "×")
    for key, what in (("load_to_first_trace_seconds", "g3n.load call to the first finished trace"),
                      ("text_bytes_read_seconds", "reading the text tensors' bytes alone")):
        if key in results.get("load", {}):
            add("G5", what, results["load"][key], None, "s")
    if "patching" in results:
        add("G6", f"patches/s, sweep ({results['patching']['chunk']} per forward) / one trace per patch, "
                  f"B1×T{results['patching']['tokens']}", results["patching"]["speedup"], 10.0, "×", at_least=True)
    load = results.get("load", {})
    if "host_rss_added_bytes" in load:
        add("G5", "host memory the load added (peak RSS − RSS before) / (per-layer table + 1 GiB)",
            load["host_rss_added_bytes"] / (load["host_table_bytes"] + GIB), 1.0, "×")
    return rows


class _PeakRSS:
    """The highest RSS seen while the block runs, sampled every 5 ms from another thread (Linux)."""

    def __enter__(self) -> _PeakRSS:
        self.before = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure_load(checkpoint: Path, device: str) -> dict[str, float]:
    """G5: from the `g3n_probe.load` call to the first finished trace, and the time to read the text bytes."""
    from ._util import SAFETENSORS_DTYPE_BYTES
    from .loading import is_text_key, load, read_exactly, tensor_offsets, weight_map

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
    by_file: dict[str, list[str]] = {}
    for key, filename in weight_map(checkpoint).items():
        if is_text_key(key):
            by_file.setdefault(filename, []).append(key)
    buffer = torch.empty(16 * 1024**2, dtype=torch.uint8).numpy()
    for filename, keys in by_file.items():
        path = checkpoint / filename
        offsets = tensor_offsets(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            for key in keys:
                stored, shape, first = offsets[key]
                size = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[stored]
                for done in range(0, size, len(buffer)):
                    read_exactly(fd, first + done, buffer[: min(len(buffer), size - done)], path)
                text_bytes += size
        finally:
            os.close(fd)
    read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with _PeakRSS() as rss:
        model = load(checkpoint, device=device)
    table = arch.per_layer_table(model._module).weight
    table_bytes = table.numel() * table.element_size() if table.device.type == "cpu" else 0
    del table
    ids = torch.randint(3, model.text_config.vocab_size_per_layer_input, (1, 16), device=device)
    with torch.no_grad(), model.trace(ids, logits_to_keep=1):
        model.logits.output.save()
    _sync(torch.device(device))
    seconds = time.perf_counter() - start
    del model
    result = {"load_to_first_trace_seconds": seconds, "text_bytes_read_seconds": read_seconds, "text_bytes": text_bytes}
    if torch.device(device).type != "cpu":   # on the host the whole model is host memory, as it should be
        result.update(host_rss_added_bytes=rss.peak - rss.before, host_table_bytes=table_bytes)
    return result


def measure_patching(model: Any, tokens: int, chunk: int, layers: list[int] | None = None) -> dict[str, Any]:
    """Patches per second of `patching.sweep` (``chunk`` variants per forward, layers before a chunk's first
    patch reused) against a loop of one plain trace per patch, on the same patches: ``resid_mid`` at
    ``layers`` (default all) × every position of a random B1×T prompt pair whose middle token differs, with
    a last-position logit difference (``logits_to_keep=1``). The sweep's time includes its own set-up (the
    source cache and the two baseline forwards); the loop's does not."""
    from . import patching
    from .points import POINTS

    vocab = model.text_config.vocab_size_per_layer_input
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(3, vocab, (1, tokens), generator=generator)
    corrupted = clean.clone()
    corrupted[0, tokens // 2] = (corrupted[0, tokens // 2] + 1) % vocab

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 7] - logits[:, -1, 8]

    layers = list(range(model.text_config.num_hidden_layers)) if layers is None else layers
    device = next(model._module.parameters()).device
    variants = [(layer, "resid_mid", position) for layer in layers for position in range(tokens)]
    by_name = {p.name: p for p in POINTS}
    source = model.cache(clean, ["resid_mid"], layers=layers, verbose=False)

    def loop() -> int:
        for variant in variants:
            patching.patched_metric(model, corrupted, [variant], source, by_name, metric, logits_to_keep=1)
        return len(variants)

    def sweep() -> int:
        return patching.sweep(model, clean, corrupted, metric, layers=layers, chunk=chunk, logits_to_keep=1).forwards

    results: dict[str, Any] = {"tokens": tokens, "layers": layers, "chunk": chunk}
    patching.sweep(model, clean, corrupted, metric, layers=layers[:1], positions=[0, 1], chunk=chunk,
                   logits_to_keep=1)   # warm-up
    for label, run in (("one_per_trace", loop), ("sweep", sweep)):
        _sync(device)
        start = time.perf_counter()
        forwards = run()
        _sync(device)
        seconds = time.perf_counter() - start
        results[label] = {"seconds": seconds, "patches": len(variants),
                          "patches_per_second": len(variants) / seconds, "forwards": forwards}
    results["speedup"] = results["sweep"]["patches_per_second"] / results["one_per_trace"]["patches_per_second"]
    return results


def check_markdown(rows: list[dict[str, Any]], device_name: str) -> str:
    lines = [f"GPU check on {device_name}", "", "| target | what | measured | limit | |", "|---|---|---|---|---|"]
    for row in rows:
        limit = "" if row["limit"] is None else f"{'≥' if row.get('at_least') else '≤'} {row['limit']:g} {row['unit']}"
        verdict = "" if row["ok"] is None else ("ok" if row["ok"] else "**missed**")
        lines.append(f"| {row['target']} | {row['what']} | {row['value']:.3f} {row['unit']} | {limit} | {verdict} |")
    return "\n".join(lines)
