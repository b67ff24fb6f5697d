"""Activations per second through the SAE training path (`g3n.sae.train`, EleutherAI's sparsify), beside the
model's own forward on the same tokens, and the cost of a splice.

    python benchmarks/sae_bench.py                   # CPU, the `mid` preset
    python benchmarks/sae_bench.py --device cuda --preset e2b

Random weights and random byte tokens (the cost is what matters). Each training run is one pass over the same
token chunks (sparsify computes activations on the fly, so an activation costs a model forward plus the SAE's
step): a plain point (``layers.2.mlp_out``), one stream of a stack (``layers.2.output``, stream 1, through
the stream tap), and transcoders for every layer's MLP at once (`g3n.sae.train_transcoders`: one sparsify run,
each token trains all L coders, MLP input → ``mlp_out``; its rate counts tokens, not tokens × layers).
Training runs the forward with the last position's logits only (its FVU loss reads none), so the fair baseline
is the second row. On a shared 2-core machine run it with OMP_NUM_THREADS=1.
Figures go to benchmarks/results/sae_<device>_<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _forward_rate(model, chunks: torch.Tensor, batch: int, **kwargs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(chunks), batch):
            model.hf_model(chunks[i:i + batch].to(model.hf_model.device), use_cache=False, **kwargs)
    if model.hf_model.device.type == "cuda":
        torch.cuda.synchronize()
    return chunks.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None, choices=[None, "tiny", "mid", "e2b", "e4b"])
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=32, help="token chunks per pass (ctx-len tokens each)")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds; each row reports its best (other work on a shared machine only slows a round)")
    args = parser.parse_args()
    import sparsify

    import g3n_probe as g3n
    from g3n_probe.checkpoint.synthetic import build_tokenizer, random_model

    device = torch.device(args.device)
    preset = args.preset or ("e2b" if device.type == "cuda" else "mid")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    module = random_model(preset, device=device, dtype=dtype)
    model = g3n.Gemma3nProbe(module, tokenizer=build_tokenizer(module.config))
    vocab = min(model.text_config.vocab_size_per_layer_input, 260)  # byte tokens: what a text would give
    chunks = torch.randint(7, vocab, (args.chunks, args.ctx_len), generator=torch.Generator().manual_seed(0))
    chunks[:, 0] = model.tokenizer.bos_token_id
    shape = dict(k=args.k, expansion_factor=args.expansion, ctx_len=args.ctx_len, batch_size=args.batch, progress=False)
    _forward_rate(model, chunks[:args.batch], args.batch)  # warm-up
    layers = model.text_config.num_hidden_layers
    rows: dict[str, float] = {}

    def best(label: str, rate: float) -> None:
        rows[label] = max(rows.get(label, 0.0), rate)

    sae = None
    for _ in range(args.repeats):  # rounds interleave the rows, so a busy spell slows every kind alike
        best("model forward alone, every position's logits", _forward_rate(model, chunks, args.batch))
        best("model forward alone, last position's logits (as training runs it)",
             _forward_rate(model, chunks, args.batch, logits_to_keep=1))
        for label, point, stream in [("train layers.2.mlp_out", "layers.2.mlp_out", None),
                                     ("train layers.2.output, stream 1 (stream tap)", "layers.2.output", 1)]:
            result = g3n.sae.train(model, chunks, point, stream=stream, **shape)
            best(label, result.activations_per_s)
            sae = sae or result.sae
        _, stats = g3n.sae.train_transcoders(model, chunks, "all", **shape)
        best(f"train transcoders, all {layers} MLPs in one run (tokens/s; each token trains {layers} coders)",
             stats.tokens_per_s)
        with g3n.sae.spliced(model, "layers.2.mlp_out", sae):
            best("forward with that SAE spliced in (layers.2.mlp_out), every position's logits",
                 _forward_rate(model, chunks, args.batch))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = ["| path | activations (tokens) / s |", "|---|---|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in rows.items()]
    text = "\n".join(lines) + (f"\n\n{preset}, D={model.text_config.hidden_size}, SAE {sae.num_latents} latents, "
                               f"k={args.k}, {len(chunks)} chunks × {args.ctx_len} tokens, batch {args.batch}, one "
                               f"pass, best of {args.repeats} rounds; eai-sparsify {sparsify.__version__}, torch {torch.__version__}")
    print(f"\n{name}, {dtype}, {torch.get_num_threads()} threads\n{text}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"sae_{device.type}_{preset}.json").write_text(json.dumps(
        {"device": name, "dtype": str(dtype), "preset": preset, "threads": torch.get_num_threads(),
         "ctx_len": args.ctx_len, "batch": args.batch, "chunks": len(chunks), "repeats": args.repeats, "latents": sae.num_latents, "k": args.k,
         "sparsify": sparsify.__version__, "activations_per_s": rows}, indent=2))
    (out / f"sae_{device.type}_{preset}.md").write_text(f"{name}, {dtype}, {torch.get_num_threads()} threads\n\n{text}\n")


if __name__ == "__main__":
    main()
