"""Train the bundled default's transcoders: all six MLPs, one sparsify run, shipped in circuit-tracer's layout.

The texts are the default's own training corpus (``scripts/train_default.py``'s ``corpus()``: the standard
library's ``.py`` files, tests excluded, split by file), a seeded sample of its training files up to
``--tokens``; the figures in ``transcoders.json`` come from `g3n.sae.evaluate_replacement` on blocks of its
held-out files (``<bos>`` excluded, the package's rule). Everything is seeded; CPU, a couple of minutes.

    OMP_NUM_THREADS=2 python scripts/train_transcoders.py --out src/g3n_probe/data/default/transcoders
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _corpus():
    spec = importlib.util.spec_from_file_location("train_default", HERE / "train_default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.corpus()


def training_texts(tokenizer, files: list[Path], tokens: int, seed: int) -> list[str]:
    """A seeded sample of whole training files, until about ``tokens`` tokens."""
    order = list(files)
    random.Random(seed).shuffle(order)
    texts, total = [], 0
    for path in order:
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(tokenizer(text)["input_ids"])
        if total >= tokens:
            break
    return texts


def held_out_texts(files: list[Path], count: int, seed: int) -> list[str]:
    """``count`` blocks (paragraphs of code, at least 40 characters, at most 1,500) of the held-out files."""
    blocks = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        blocks += [b for b in text.split("\n\n") if 40 < len(b.strip()) and len(b) <= 1500]
    random.Random(seed).shuffle(blocks)
    return blocks[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE.parent / "src/g3n_probe/data/default/transcoders")
    parser.add_argument("--tokens", type=int, default=200_000, help="training tokens (one pass)")
    parser.add_argument("--latents", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=50, help="sparsify's lr_warmup_steps")
    parser.add_argument("--eval-texts", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import sparsify

    import g3n_probe as g3n

    torch.manual_seed(args.seed)
    model = g3n.load()
    train_files, held_files = _corpus()
    texts = training_texts(model.tokenizer, train_files, args.tokens, args.seed)
    start = time.perf_counter()
    transcoders, stats = g3n.sae.train_transcoders(
        model, texts, "all", k=args.k, num_latents=args.latents, ctx_len=args.ctx_len, batch_size=args.batch,
        seed=args.seed, progress=False, lr_warmup_steps=args.warmup, auxk_alpha=1 / 32, dead_feature_threshold=20_000)
    print(stats)
    transcoders.to(dtype=torch.float32)
    g3n.sae.save_transcoders(args.out, transcoders)
    report = g3n.sae.evaluate_replacement(model, held_out_texts(held_files, args.eval_texts, args.seed),
                                          g3n.sae.load_transcoders(args.out))
    print(report)
    record = {
        "made_by": "scripts/train_transcoders.py (g3n_probe.sae.train_transcoders, one sparsify run for all layers)",
        "texts": f"{len(texts)} training files of the default's corpus (seed {args.seed}); evaluated on "
                 f"{args.eval_texts} blocks of its held-out files",
        "train_tokens": stats.tokens, "train_seconds": round(stats.seconds, 1),
        "train_tokens_per_s": round(stats.tokens_per_s, 1), "wall_seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(), "latents": args.latents, "k": args.k, "ctx_len": args.ctx_len,
        "batch": args.batch, "lr_warmup_steps": args.warmup, "seed": args.seed, "skip": False,
        "output_hook": transcoders.output_hook, "include_bos": False, "sparsify": sparsify.__version__,
        "torch": torch.__version__,
        "last_step_fvu": {str(layer): round(values[-1], 4) for layer, values in stats.fvu.items()},
        "evaluation": report.to_dict(),
    }
    (args.out / "transcoders.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
