"""Training an SAE or a transcoder on a Gemma 3n point with EleutherAI's sparsify (the ``sae`` extra).

sparsify (``pip install "g3n_probe[sae]"``, eai-sparsify 1.3) trains k-sparse autoencoders on the outputs of
a Hugging Face model's modules, named as ``model.base_model.named_modules()`` names them, computing the
activations on the fly. Every g3n_probe point is such a module (``language_model.layers.3.mlp_out`` under a
``Gemma3nForConditionalGeneration``), so a point trains as it is, on the library's own loop: its
initialisation, loss (FVU), optimizer (sign-SGD with schedule-free averaging), dead-latent statistics,
checkpoints and DDP. The glue here is what a Gemma 3n point needs beyond that, and no more:

- **stream stacks** ``[S,B,T,D]``: sparsify flattens a module's first two axes as (batch, token), which for a
  stack are (stream, batch) — it would train on the wrong rows. `train` takes ``stream=k`` and hands sparsify an
  identity module whose output is that stream, ``[B,T,D]``, so the library sees the true rows (and, for a
  loss through the model, writes that stream back); a stack without ``stream=`` is refused.
- **texts**: sparsify takes equal-length token chunks. `train` tokenizes the texts (each with its BOS), packs
  and chunks them, shuffles the chunks (seeded; sparsify does not), gives each ``torchrun`` rank its share, and
  leaves padding and (unless ``include_bos=True``) ``<bos>`` out of training (sparsify's ``exclude_tokens``;
  the package's one ``<bos>`` rule, `g3n_probe.sae.tokens`).
- the averaged weights: sparsify's schedule-free optimizer keeps the weights it evaluates separate from the ones
  it steps; the returned SAE is sparsify's own final checkpoint, which has the averaged ones.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .._compat import remove_child
from .._util import rank_world
from ..points import BY_NAME, checked_stream, concrete_shape, mark_stack, split_qualified
from .splice import Site, site_of
from .tokens import excluded_ids


@dataclass
class Trained:
    """What `train` returns: the SAE (a sparsify ``SparseCoder``) and how its training went.

    ``fvu`` holds sparsify's fraction of variance unexplained for every batch, in order; ``hookpoint`` the
    module name sparsify trained on; ``path`` where sparsify saved it (``SparseCoder.load_from_disk(path)``),
    or None when no ``save_dir`` was given."""

    sae: Any
    point: str
    stream: int | None
    hookpoint: str
    fvu: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    path: Path | None = None

    @property
    def activations_per_s(self) -> float:
        """Training throughput: activations (token rows, the model forward included) per second."""
        return self.tokens / self.seconds if self.seconds else 0.0


def sparsify_module() -> Any:
    """The ``sparsify`` package, or an error that says how to install it."""
    try:
        import sparsify  # lazy: the optional ``sae`` extra
    except ImportError as error:
        raise ImportError("g3n.sae.train uses EleutherAI's sparsify: pip install \"g3n_probe[sae]\" "
                          "(eai-sparsify 1.3)") from error
    return sparsify


def train(model: Any, texts: Sequence[str] | torch.Tensor, point: str, *, stream: int | None = None, transcoder: bool = False,
          expansion_factor: int = 4, num_latents: int = 0, k: int = 16, ctx_len: int = 128, batch_size: int = 8,
          lr: float | None = None, seed: int = 0, save_dir: str | os.PathLike | None = None, progress: bool = True,
          include_bos: bool = False, **config: Any) -> Trained:
    """Train an SAE on ``point`` of ``model`` (a `g3n_probe.Gemma3nProbe`) over ``texts``, with sparsify:
    one pass over their tokens (`token_chunks`; a long tensor ``[n, ctx_len]`` of token chunks works too).

    ``point``: a qualified point name (``"layers.3.mlp_out"``, ``"layers.2.ple_out"``, ``"layers.3.output"`` with
    ``stream=k``), or ``"layers.<i>.mlp"`` with ``transcoder=True`` (MLP input → MLP output, as sparsify's
    ``transcode``). ``expansion_factor``/``num_latents`` and ``k`` shape the SAE; ``ctx_len`` and
    ``batch_size`` (chunks per step) the batches; every other keyword goes to sparsify's ``TrainConfig``
    (``loss_fn="kl"``, ``optimizer="adam"``, ``auxk_alpha``, ``grad_acc_steps``, …). Under ``torchrun`` each
    rank trains on its share of the chunks and sparsify wraps the SAE in DDP (one GPU per rank: sparsify
    passes ``device_ids=[rank]``). The model is left as it was (its ``requires_grad`` flags included).
    ``include_bos=False`` (default): ``<bos>`` positions are not trained on (nor padding); True trains on them.
    """
    sparsify_module()
    site = site_of(model, point, transcoder=transcoder)
    if transcoder and site.side != "across":
        raise ValueError("transcoder=True trains across an MLP: name it 'layers.<i>.mlp'")
    if site.stack and stream is None:
        raise ValueError(f"{point} is a stream stack [S,B,T,D]: give stream=k (0 is the active stream); sparsify "
                         "would read its first two axes, (stream, batch), as (batch, token) and train on the wrong rows")
    stream = checked_stream(stream, site.stack, point, model.text_config.altup_num_inputs)
    checked_width(k, expansion_factor, num_latents, _input_width(model, site))
    chunks = training_chunks(model, texts, ctx_len, seed)
    with _hookpoint(model.hf_model, site, stream) as hookpoint:
        run = run_sparsify(model, chunks, [hookpoint], dict(expansion_factor=expansion_factor, num_latents=num_latents,
                                                             k=k, transcode=transcoder),
                           batch_size=batch_size, lr=lr, seed=seed, save_dir=save_dir, progress=progress,
                           include_bos=include_bos, config=config)
    return Trained(run.coders[hookpoint], point, stream, hookpoint, run.fvu[hookpoint], run.tokens, run.seconds,
                   run.paths.get(hookpoint))


def _input_width(model: Any, site: Site) -> int:
    """The width of the rows the SAE reads at ``site`` (a transcoder: the MLP's input, the hidden size)."""
    if site.side == "across" or site.stack:
        return model.text_config.hidden_size
    layer, base = split_qualified(site.name)
    return concrete_shape(BY_NAME[base], model.text_config, layer=layer or 0)[-1]


def checked_width(k: Any, expansion_factor: Any, num_latents: Any, d_in: int) -> int:
    """The number of latents, refusing before any forward a shape sparsify would fail on deep in torch (``k``
    past the latents, no latents at all)."""
    for name, value in (("expansion_factor", expansion_factor), ("num_latents", num_latents)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    width = num_latents or expansion_factor * d_in
    if width < 1:
        raise ValueError("an SAE needs latents: give expansion_factor ≥ 1 or num_latents ≥ 1")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width:
        raise ValueError(f"k={k!r} is out of range: it must be an integer in 1..{width} (the latents)")
    return width


def training_chunks(model: Any, texts: Sequence[str] | torch.Tensor, ctx_len: int, seed: int) -> torch.Tensor:
    """This rank's share of the token chunks (`token_chunks`), after checking that sparsify's DDP can run here."""
    rank, world = rank_world(from_environment=False)   # sparsify's DDP needs the group itself
    if world > 1 and model.hf_model.device.type != "cuda":
        raise ValueError("sparsify's distributed training wraps the SAE in DDP(device_ids=[rank]): it needs one GPU "
                         "per rank (the model on cuda:<rank>); on CPU train in one process")
    return token_chunks(model.tokenizer, texts, ctx_len, seed=seed, rank=rank, world=world)


@dataclass
class SparsifyRun:
    """One sparsify run over some hookpoints: each one's final coder, FVU per step and saved folder."""

    coders: dict[str, Any]
    fvu: dict[str, list[float]]
    tokens: int
    seconds: float
    paths: dict[str, Path]


def run_sparsify(model: Any, chunks: torch.Tensor, hookpoints: list[str], coder: dict[str, Any], *, batch_size: int,
                 lr: float | None, seed: int, save_dir: Any, progress: bool, include_bos: bool,
                 config: dict[str, Any]) -> SparsifyRun:
    """Train one coder per hookpoint (module names under ``hf_model.base_model``) in one sparsify run, one pass
    over ``chunks``: ``coder`` is sparsify's ``SaeConfig``, ``config`` more of its ``TrainConfig``. The model is
    left as it was; the coders come back frozen, as sparsify's final checkpoints hold them."""
    sparsify = sparsify_module()
    hf = model.hf_model
    lean = config.get("loss_fn", "fvu") == "fvu"
    with _model_kept(hf, lean), _quiet(not progress), _directory(save_dir) as directory:
        cfg = sparsify.TrainConfig(
            sparsify.SaeConfig(**coder), batch_size=batch_size, hookpoints=list(hookpoints), lr=lr, init_seeds=[seed],
            log_to_wandb=False, save_dir=str(directory), run_name="g3n",
            exclude_tokens=excluded_ids(model.tokenizer, include_bos), **config)
        cfg.save_every = config.get("save_every", 1 << 30)
        trainer = sparsify.Trainer(cfg, _Chunks(chunks), hf)
        fvu: dict[str, list[float]] = {hookpoint: [] for hookpoint in hookpoints}
        recorders = [trainer.saes[h].register_forward_hook(functools.partial(_record_fvu, fvu[h])) for h in hookpoints]
        start = time.perf_counter()
        try:
            trainer.fit()
        finally:
            for recorder in recorders:
                recorder.remove()
        seconds = time.perf_counter() - start
        coders = {h: _final(sparsify, trainer, Path(directory) / "g3n" / h, hf.device, h) for h in hookpoints}
        paths = {h: Path(directory) / "g3n" / h for h in hookpoints} if save_dir is not None else {}
    for trained in coders.values():
        trained.requires_grad_(False)
    return SparsifyRun(coders, fvu, chunks.numel(), seconds, paths)  # one pass over this rank's chunks


def _final(sparsify: Any, trainer: Any, path: Path, device: torch.device, hookpoint: str) -> Any:
    """The SAE as sparsify's final checkpoint holds it: schedule-free averaging keeps the weights it evaluates
    apart from the ones it steps, and its checkpoint has the averaged ones (only rank 0 writes it: the other
    ranks switch their optimizer to the averaged weights, equal to its checkpoint to float rounding)."""
    if (path / "sae.safetensors").exists():
        return sparsify.SparseCoder.load_from_disk(path, device=device)
    for optimizer in trainer.optimizers:
        if callable(getattr(optimizer, "eval", None)):
            optimizer.eval()
    return trainer.saes[hookpoint]


def token_chunks(tokenizer: Any, texts: Sequence[str], ctx_len: int, seed: int = 0, rank: int = 0,
                 world: int = 1) -> torch.Tensor:
    """``texts`` tokenized (each with its BOS), packed end to end and cut into ``[n, ctx_len]`` chunks
    (the tail dropped), shuffled with ``seed``; under ``world`` ranks, rank ``rank``'s equal share. ``texts``
    may also be the chunks themselves, a long tensor ``[n, ctx_len]`` (then only shuffled and shared)."""
    if isinstance(texts, torch.Tensor):  # chunks already: [n, ctx_len] token ids
        if texts.dim() != 2 or texts.dtype != torch.long or texts.shape[1] != ctx_len:
            raise ValueError(f"token chunks must be a long tensor [n, ctx_len={ctx_len}]; got {texts.dtype} "
                             f"{list(texts.shape)}")
        chunks, n = texts, texts.shape[0]
    else:
        if tokenizer is None:
            raise ValueError("training tokenizes its texts, and this model has no tokenizer")
        if isinstance(texts, str) or not texts:
            raise TypeError("texts must be a non-empty list of strings (or a long tensor [n, ctx_len] of token chunks)")
        if isinstance(ctx_len, bool) or not isinstance(ctx_len, int) or ctx_len < 2:
            raise ValueError(f"ctx_len must be an integer ≥ 2; got {ctx_len!r}")
        ids = tokenizer(list(texts), verbose=False)["input_ids"]
        flat = torch.tensor([t for row in ids for t in row], dtype=torch.long)
        n = flat.numel() // ctx_len
        chunks = flat[:n * ctx_len].view(n, ctx_len)
    if n < world:
        raise ValueError(f"{n} chunk(s) of ctx_len={ctx_len} tokens: fewer than one per rank ({world} ranks)")
    chunks = chunks[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    share = n // world
    return chunks[rank * share:(rank + 1) * share]


class _Chunks(torch.utils.data.Dataset):
    """Token chunks as sparsify reads them: ``{"input_ids": [ctx_len]}`` per item."""

    def __init__(self, chunks: torch.Tensor) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[i]}


class StreamTap(nn.Module):
    """An identity module whose output is one stream of a stack, ``[B,T,D]``: the module sparsify hooks."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value


def _tap_output(tap: StreamTap, stream: int, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
    return _through_tap(tap, stream, output)


def _tap_input(tap: StreamTap, stream: int, module: nn.Module, args: tuple) -> Any:
    spliced = _through_tap(tap, stream, args[0])
    return None if spliced is None else (spliced, *args[1:])


def _through_tap(tap: StreamTap, stream: int, stack: torch.Tensor) -> torch.Tensor | None:
    picked = stack[stream]
    got = tap(picked)
    if got is picked:
        return None  # read only (sparsify's FVU loss): the stack goes on untouched
    return mark_stack(torch.cat([stack[:stream], got[None], stack[stream + 1:]]))


@contextlib.contextmanager
def _hookpoint(hf: nn.Module, site: Site, stream: int | None) -> Iterator[str]:
    """The module name sparsify should hook for ``site`` (a tap on one stream for a stack), while it exists."""
    base = hf.base_model
    if not site.stack:
        yield _module_name(base, site.module)
        return
    if stream >= hf.config.get_text_config().altup_num_inputs:
        raise ValueError(f"stream {stream} out of range: the stacks have {hf.config.get_text_config().altup_num_inputs} streams")
    tap, child = StreamTap(), f"{site.side}_stream{stream}"
    site.module.add_module(child, tap)
    if site.side == "input":
        handle = site.module.register_forward_pre_hook(functools.partial(_tap_input, tap, stream))
    else:
        handle = site.module.register_forward_hook(functools.partial(_tap_output, tap, stream))
    try:
        yield _module_name(base, tap)
    finally:
        handle.remove()
        remove_child(site.module, child)


def _module_name(root: nn.Module, module: nn.Module) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a module of this model's {type(root).__name__}")


def _record_fvu(history: list, module: nn.Module, args: tuple, output: Any) -> None:
    history.append(float(output.fvu.detach()))


def _lean(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs.setdefault("logits_to_keep", 1)
    kwargs.setdefault("use_cache", False)
    return args, kwargs


@contextlib.contextmanager
def _model_kept(hf: nn.Module, lean: bool) -> Iterator[None]:
    """sparsify freezes the model (``requires_grad_(False)``) and sets the float32 matmul precision: undone after.
    With ``lean`` (the FVU loss, which reads no logits) the model computes the last position's logits only and
    no KV cache: sparsify discards the output, and the vocabulary projection of every position would cost more
    than the rest of a small model's forward."""
    flags = [(p, p.requires_grad) for p in hf.parameters()]
    precision = torch.get_float32_matmul_precision()
    handle = hf.register_forward_pre_hook(_lean, with_kwargs=True) if lean else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        torch.set_float32_matmul_precision(precision)


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    if not quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def _directory(save_dir: Any) -> Iterator[Path]:
    if save_dir is not None:
        yield Path(save_dir)
        return
    with tempfile.TemporaryDirectory(prefix="g3n-sae-") as scratch:  # sparsify always saves at the end
        yield Path(scratch)
