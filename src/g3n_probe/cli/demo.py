"""``g3n-probe demo``: what the tool shows on one code prompt, in under a minute on a CPU.

1. load the checkpoint text-only and trace a code prompt, saving every layer's output stack;
2. a logit-lens table across layers *through the AltUp merge* (the model's own readout);
3. the effect on the next-token distribution of zeroing one layer's PLE contribution (``ple_out``)
   and of removing one layer's AltUp correction (``altup_correct`` := ``altup_predict``);
4. a plot of the lens (probability of the model's final prediction at every layer) and the effects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..loading import load, resolve_source

DEFAULT_PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n -"


def _token(tokenizer: Any, token_id: int) -> str:
    return repr(tokenizer.decode([token_id]))[1:-1][:12]


def run_demo(source: str | None, out: Path, prompt: str | None = None, console: Console | None = None,
             load_options: dict[str, Any] | None = None) -> dict:
    console = console or Console()
    prompt = prompt or DEFAULT_PROMPT
    directory = resolve_source(source, **(load_options or {}))   # a first fetch shows its own byte progress
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("loading the checkpoint text-only", total=None)
        model = load(directory)
        text = model.text_config
        layers = text.num_hidden_layers
        progress.update(task, description="tracing the prompt")
        stacks = []
        with torch.no_grad(), model.trace(prompt):
            for i in range(layers):
                stacks.append(model.layers[i].output.save())
            logits = model.logits.output.save()
        progress.update(task, description="logit lens through the AltUp merge")
        with torch.no_grad():
            lens = torch.stack([model.lens(stack, layer=i, text_only=True)[0, -1].softmax(-1) for i, stack in enumerate(stacks)])
        final = logits[0, -1].softmax(-1)
        top = int(final.argmax())
        ablations = {}
        ple_layer, altup_layer = min(layers - 1, layers // 2), min(layers - 1, 1)
        progress.update(task, description=f"zeroing layer {ple_layer}'s ple_out")
        with torch.no_grad(), model.trace(prompt):
            model.layers[ple_layer].ple_out.output[:] = 0
            ablated = model.logits.output.save()
        ablations[f"layer {ple_layer} ple_out = 0"] = ablated[0, -1].softmax(-1)
        progress.update(task, description=f"removing layer {altup_layer}'s AltUp correction")
        with torch.no_grad(), model.trace(prompt):
            predicted = model.layers[altup_layer].altup_predict.output
            model.layers[altup_layer].altup_correct.output = predicted.clone()
            ablated = model.logits.output.save()
        ablations[f"layer {altup_layer} AltUp correction removed"] = ablated[0, -1].softmax(-1)
        progress.update(task, description="done")

    results = _print_tables(console, model.tokenizer, prompt, lens, final, top, ablations)
    _plot(lens[:, top].tolist(), {k: float(v[top]) for k, v in ablations.items()}, float(final[top]),
          _token(model.tokenizer, top), out)
    console.print(f"plot saved to {out}")
    results["lens"] = lens[:, top].tolist()
    return results


def _print_tables(console: Console, tokenizer: Any, prompt: str, lens: torch.Tensor, final: torch.Tensor, top: int,
                  ablations: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The logit-lens table and the ablations' effects; returns each ablation's KL."""
    results: dict[str, Any] = {}
    layers = lens.shape[0]
    console.print(f"[bold]prompt[/bold] (last 40 chars): {prompt[-40:]!r}")
    table = Table(title="Logit lens through the AltUp merge: top next tokens per layer (last position)")
    table.add_column("layer")
    for k in range(3):
        table.add_column(f"top {k + 1}")
    table.add_column(f"p({_token(tokenizer, top)!s})")
    for i in range(layers):
        probs, ids = lens[i].topk(3)
        table.add_row(str(i), *[f"{_token(tokenizer, int(t))} {float(p):.2f}" for p, t in zip(probs, ids)], f"{float(lens[i, top]):.3f}")
    probs, ids = final.topk(3)
    table.add_row("model", *[f"{_token(tokenizer, int(t))} {float(p):.2f}" for p, t in zip(probs, ids)], f"{float(final[top]):.3f}")
    console.print(table)

    effects = Table(title="Ablations: effect on the next-token distribution")
    for column in ("edit", "KL(model ‖ edited)", f"p({_token(tokenizer, top)}) before → after", "new top token"):
        effects.add_column(column)
    for label, dist in ablations.items():
        kl = float(torch.sum(final * (final.clamp_min(1e-30).log() - dist.clamp_min(1e-30).log())))
        effects.add_row(label, f"{kl:.4f}", f"{float(final[top]):.3f} → {float(dist[top]):.3f}", _token(tokenizer, int(dist.argmax())))
        results[label] = kl
    console.print(effects)

    return results


def _plot(lens: list[float], ablations: dict[str, float], final: float, token: str, out: Path) -> None:
    import matplotlib  # lazy: a heavy import only the plot needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(range(len(lens)), lens, marker="o")
    left.axhline(final, color="gray", linestyle="--", label="model output")
    left.set_xlabel("layer")
    left.set_ylabel(f"p({token}) through the AltUp merge")
    left.set_title("logit lens")
    left.legend()
    names = ["unedited", *ablations]
    right.barh(names, [final, *ablations.values()])
    right.set_xlabel(f"p({token}) at the last position")
    right.set_title("ablations")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
