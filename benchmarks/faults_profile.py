"""Where a forward's fresh memory comes from: minor page faults per forward, module by module, stock beside
the probe.

A minor page fault is the kernel handing the process a fresh 4 KiB page. With glibc's default allocator a
large block is a fresh mapping, or heap the allocator gave back and asks for again, so faults count the
memory a forward could not reuse. The modes run in rounds, every mode once a round (two rounds to warm up,
then five counted), so that they share the allocator's history; a forward pre-hook and a forward hook on
every module count the faults inside it (inclusive), summed over the layers:

* the modes of `points_bench` (its `MODES`, built by its `build_models` and `mode_runs`): ``stock``, a
  never-injected copy of the model, plain call; ``stock_twin``, a second one (how far two identical models
  read apart: the noise of the count); ``injected``, the injected model, plain call; ``trace``, a trace
  saving nothing; ``trace_all_saved``, a trace saving every row of the table at every layer.

    python benchmarks/faults_profile.py                      # CPU, mid, B8×T256, one thread
    python benchmarks/faults_profile.py --batch 4 --tokens 128

Faults are not additive point by point: glibc's thresholds adapt (a freed mapping raises the mmap threshold;
the heap is trimmed only past its trim threshold), and a kept tensor can pin heap that would otherwise be
given back, so saving one more point can even lower a later forward's count. The table therefore compares
whole modes, module by module. Figures go to benchmarks/results/faults_<preset>_<B>x<T>.md.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

import torch
from points_bench import MODES, build_models, faults, mode_runs, rotated  # the modes points_bench times

HERE = Path(__file__).resolve().parent


def _count_inside(module: torch.nn.Module, tally: dict) -> list:
    """Hooks adding the faults inside every submodule of ``module`` to ``tally["counts"][tally["mode"]]`` (layers
    merged) while ``tally["mode"]`` is set."""
    handles, started = [], {}
    for name, sub in module.named_modules():
        key = re.sub(r"layers\.\d+", "layers.*", name) or "(whole forward)"

        def before(sub_: torch.nn.Module, args: tuple, name=name) -> None:
            started[name] = faults()

        def after(sub_: torch.nn.Module, args: tuple, output: object, name=name, key=key) -> None:
            inside = faults() - started.pop(name)
            if tally["mode"] is not None:
                tally["counts"][tally["mode"]][key] += inside

        handles += [sub.register_forward_pre_hook(before), sub.register_forward_hook(after)]
    return handles


def profile(runs: dict, modules: list[torch.nn.Module], repeats: int) -> dict[str, collections.Counter]:
    """Faults per forward of each ``runs[mode]()``, by (layer-merged) module name: every mode once per round in
    an order rotated from round to round, two rounds to warm up and ``repeats`` counted, so that all modes share
    the allocator's history and none always follows the same one."""
    tally: dict = {"mode": None, "counts": {mode: collections.Counter() for mode in runs}}
    handles = [handle for module in modules for handle in _count_inside(module, tally)]
    try:
        for round_ in range(2 + repeats):
            for mode in rotated(list(runs), round_):
                tally["mode"] = mode if round_ >= 2 else None
                runs[mode]()
    finally:
        for handle in reversed(handles):
            handle.remove()
    return {mode: collections.Counter({key: value // repeats for key, value in counter.items()})
            for mode, counter in tally["counts"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid", choices=["tiny", "mid", "e2b", "e4b"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-difference", type=int, default=2000, help="rows shown: a mode this far from stock")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stock, twin, probe = build_models(args.preset, torch.device("cpu"), torch.float32)
    ids = torch.randint(3, stock.config.get_text_config().vocab_size_per_layer_input, (args.batch, args.tokens))
    counts = profile(mode_runs(stock, twin, probe, ids), [stock, twin, probe.hf_model], args.repeats)
    names = sorted(set().union(*counts.values()), key=lambda key: -max(c[key] for c in counts.values()))
    shown = [key for key in names if key == "(whole forward)"
             or max(abs(counts[mode][key] - counts["stock"][key]) for mode in MODES) >= args.min_difference]
    lines = [f"CPU, one thread, glibc allocator as set in the environment, preset {args.preset}, "
             f"B{args.batch}×T{args.tokens}: minor faults per forward inside each module (layers summed; rows where "
             f"a mode differs from stock by ≥ {args.min_difference})", "",
             "| module | " + " | ".join(MODES) + " |", "|---" * (len(MODES) + 1) + "|"]
    for key in shown:
        lines.append(f"| {key} | " + " | ".join(f"{counts[mode][key]:.0f}" for mode in MODES) + " |")
    text = "\n".join(lines)
    print(text)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"faults_{args.preset}_{args.batch}x{args.tokens}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
