"""g3n.load (text-only) vs stock ``from_pretrained`` on a synthetic checkpoint, measured in one run.

Each load runs in a fresh subprocess and is followed by touching every parameter (``resident_seconds``
is load plus that, ``seconds`` the load call alone), after the page cache is dropped where the OS allows it, so
the figures are the load's own: wall time, peak RSS (ru_maxrss), bytes actually read from disk
(/proc/self/io read_bytes), tensors materialised, parameters allocated. On CPU, safetensors
tensors of the checkpoint's dtype stay memory-mapped, so disk reads happen lazily as pages are
touched and can be well below the parameter bytes.

    python benchmarks/load_bench.py --preset e2b          # writes the e2b checkpoint once (~11 GB)
    python benchmarks/load_bench.py --preset tiny
    python benchmarks/load_bench.py --preset e2b --accelerator-stand-in

``--accelerator-stand-in`` measures the accelerator load's host side without an accelerator: the
loader's `Staging` targets the meta device, so every byte is read from the file and crosses the
staging buffers as on a GPU, but lands nowhere; the per-layer table is read into host storage as on a
GPU. Peak RSS is then the host's own cost of an accelerator load (target: table bytes + 1 GiB).

The stock load builds the real audio tower; the vision tower is timm's MobileNetV5, and timm cannot
be installed beside this machine's CPU torch, so in the stock load its construction is replaced by
an empty module (its 294M parameters are then neither allocated nor read: the stock figures are an
underestimate by that much).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent

_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from unittest import mock
    import torch
    from torch import nn

    def io():
        fields = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
        return int(fields["read_bytes"])

    mode, ckpt, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    import transformers, g3n_probe  # imports are not part of the load
    transformers.utils.logging.disable_progress_bar()
    before = io()
    start = time.perf_counter()
    if mode == "g3n":
        model = g3n_probe.load(ckpt, device="cpu", dtype=dtype)
        module, tensors = model._module, model.load_report.tensors_read
    elif mode == "g3n-accelerator-stand-in":
        from g3n_probe.loading import load_text_model
        from g3n_probe.checkpoint.staging import Staging
        module, report = load_text_model(ckpt, dtype=dtype, ple_device="cpu", staging=Staging("meta"))
        tensors = report.tensors_read
    else:
        from transformers import Gemma3nForConditionalGeneration
        from transformers.models.gemma3n import modeling_gemma3n
        real = modeling_gemma3n.AutoModel.from_config
        def from_config(cfg, *a, **k):
            return nn.Module() if cfg.model_type == "gemma3n_vision" else real(cfg, *a, **k)
        with mock.patch.object(modeling_gemma3n.AutoModel, "from_config", side_effect=from_config):
            module = Gemma3nForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, device_map="cpu")
        tensors = len([k for k in module.state_dict() if k != "lm_head.weight"])
    seconds = time.perf_counter() - start
    # On CPU the weights are memory-mapped and paged in lazily; touch every one so the figures
    # below cover a model whose weights are all resident.
    with torch.no_grad():
        for p in module.parameters():
            if not p.is_meta:
                p.sum()
    resident_seconds = time.perf_counter() - start
    read = io() - before
    params = sum(p.numel() for p in module.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    host = sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type == "cpu")
    # VmHWM, not ru_maxrss: after fork+exec ru_maxrss still reports the parent's size at fork.
    hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
    print(json.dumps({"mode": mode, "seconds": seconds, "resident_seconds": resident_seconds, "peak_rss_bytes": hwm,
                      "disk_read_bytes": read, "tensors_materialised": tensors, "parameters": params, "parameter_bytes": nbytes,
                      "host_parameter_bytes": host}))
    """
)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(mode: str, checkpoint: Path, dtype: str) -> dict:
    dropped = drop_page_cache()
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, str(checkpoint), dtype], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["page_cache_dropped"] = dropped
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "e2b", "e4b"])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: /tmp/g3n_probe_bench/<preset>")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--accelerator-stand-in", action="store_true",
                        help="measure the host side of an accelerator load (see above) instead of stock vs g3n")
    args = parser.parse_args()

    import g3n_probe as g3n

    checkpoint = args.checkpoint or Path("/tmp/g3n_probe_bench") / args.preset
    if not (checkpoint / "model.safetensors.index.json").exists():
        print(f"writing the synthetic {args.preset} checkpoint to {checkpoint} ...", flush=True)
        g3n.synthetic.save_checkpoint(checkpoint, args.preset, progress=True)
    on_disk = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))

    if args.accelerator_stand_in:
        row = run("g3n-accelerator-stand-in", checkpoint, args.dtype)
        table_bytes, peak = row["host_parameter_bytes"], row["peak_rss_bytes"]
        text = "\n".join([
            "| figure | accelerator load (stand-in) |", "|---|---|",
            f"| load call | {row['seconds']:.1f} s |",
            f"| bytes read from disk | {row['disk_read_bytes'] / 1024**3:.2f} GiB |",
            f"| text parameter bytes (all to the device but the table) | {row['parameter_bytes'] / 1024**3:.2f} GiB |",
            f"| host-resident parameters (the per-layer table) | {table_bytes / 1024**3:.2f} GiB |",
            f"| peak host RSS | {peak / 1024**3:.2f} GiB |",
            f"| target: table + 1 GiB | {(table_bytes + 1024**3) / 1024**3:.2f} GiB: {'met' if peak <= table_bytes + 1024**3 else 'MISSED'} |",
        ])
        print(f"\n{args.preset} checkpoint, dtype {args.dtype}, accelerator load with a meta stand-in\n{text}")
        out = HERE / "results"
        (out / f"load_{args.preset}_accelerator_stand_in.json").write_text(json.dumps(row, indent=2))
        (out / f"load_{args.preset}_accelerator_stand_in.md").write_text(text + "\n")
        return

    rows = []
    for _ in range(args.repeats):
        for mode in ("stock", "g3n"):
            rows.append(run(mode, checkpoint, args.dtype))
            print(json.dumps(rows[-1]), flush=True)

    def median(mode: str, key: str) -> float:
        values = sorted(r[key] for r in rows if r["mode"] == mode)
        return values[len(values) // 2]

    keys = ("seconds", "resident_seconds", "peak_rss_bytes", "disk_read_bytes", "tensors_materialised", "parameters", "parameter_bytes")
    table = ["| figure | stock from_pretrained | g3n.load | g3n / stock |", "|---|---|---|---|"]
    summary = {}
    for key in keys:
        s, g = median("stock", key), median("g3n", key)
        summary[key] = {"stock": s, "g3n": g, "ratio": g / s if s else None}
        fmt = (lambda v: f"{v / 1024**3:.2f} GiB") if key.endswith("bytes") else (lambda v: f"{v:,.2f}" if isinstance(v, float) else f"{v:,}")
        table.append(f"| {key} | {fmt(s)} | {fmt(g)} | {g / s:.3f} |" if s else f"| {key} | {fmt(s)} | {fmt(g)} | - |")
    text = "\n".join(table)
    print(f"\n{args.preset} checkpoint, {on_disk / 1024**3:.2f} GiB on disk, dtype {args.dtype}, CPU\n{text}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"load_{args.preset}.json").write_text(json.dumps({"preset": args.preset, "dtype": args.dtype, "checkpoint_bytes": on_disk,
                                                              "runs": rows, "summary": summary}, indent=2))
    (out / f"load_{args.preset}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
