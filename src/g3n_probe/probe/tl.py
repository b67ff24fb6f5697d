"""TransformerLens conventions on a `Gemma3nProbe`: ``to_tokens``, ``to_str_tokens``, ``to_string``,
``to_single_token``, ``test_prompt``, ``W_E``, ``W_U``, ``cfg``, ``run_with_cache`` and ``model(input)``, with
TransformerLens' signatures and output, on the stock model's own tokenizer and weights (no copies). The probe's
methods of the same names call these.

Gemma facts a TransformerLens user should know: the token embedding is scaled by √D when it is looked up
(``model.embed`` = ``W_E[ids] · √D``), the unembedding is tied to it (``W_U`` is ``W_E.T``), and the logits
are soft-capped (30·tanh(z/30)) — `test_prompt` prints the capped logits, the ones the model samples from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..activations.batch import collect, encode_inputs
from ..points import BY_NAME, split_qualified


def _tokenizer(model: Any) -> Any:
    if model.tokenizer is None:
        raise ValueError("this needs a tokenizer: pass tokenizer=... to g3n.load or Gemma3nProbe")
    return model.tokenizer


def to_tokens(model: Any, input: Any, prepend_bos: bool | None = True, padding_side: str | None = None,
              move_to_device: bool = True) -> torch.Tensor:
    """Token ids ``[batch, pos]`` for a string or a list of strings (padded on the tokenizer's side, or
    ``padding_side``). ``prepend_bos=False`` leaves Gemma's ``<bos>`` out."""
    tokenizer = _tokenizer(model)
    texts = [input] if isinstance(input, str) else list(input) if isinstance(input, (list, tuple)) else None
    if texts is None or not all(isinstance(text, str) for text in texts):
        raise TypeError(f"to_tokens takes a string or a list of strings; got {type(input).__name__}")
    if not texts:
        raise ValueError("to_tokens got an empty list: give at least one string")
    side = tokenizer.padding_side
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    try:
        ids = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=prepend_bos is not False,
                        verbose=False)["input_ids"]
    finally:
        tokenizer.padding_side = side
    return ids.to(model.hf_model.device) if move_to_device else ids


def checked_ids(model: Any, tokens: Any, what: str = "token ids") -> torch.Tensor:
    """``tokens`` as an integer tensor of one sequence (1-D) or a batch (2-D), every id in the model's vocabulary
    (an id past it would decode to ``''``, silently)."""
    try:
        ids = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{what} must be integers (a tensor or lists of ids); got {type(tokens).__name__}: {error}") from None
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{what} must be integers; got {ids.dtype}")
    if ids.dim() > 2:
        raise ValueError(f"{what} are one sequence (1-D) or a batch (2-D); got a {ids.dim()}-D tensor {tuple(ids.shape)}")
    vocab = model.text_config.vocab_size
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)].unique().tolist()[:5]
        raise ValueError(f"{what} {bad} are out of range: the vocabulary has {vocab} ids (0..{vocab - 1})")
    return ids


def to_str_tokens(model: Any, input: Any, prepend_bos: bool | None = True) -> list:
    """Each token as a string: a list for a string or a 1-D tensor/list of ids, a list of lists for a list
    of strings or a 2-D tensor."""
    tokenizer = _tokenizer(model)
    if isinstance(input, str):
        return [tokenizer.decode([int(t)]) for t in to_tokens(model, input, prepend_bos, move_to_device=False)[0]]
    if isinstance(input, (list, tuple)) and input and all(isinstance(item, str) for item in input):
        return [to_str_tokens(model, item, prepend_bos) for item in input]
    ids = checked_ids(model, input)
    if ids.dim() == 2:
        return [[tokenizer.decode([int(t)]) for t in row] for row in ids]
    return [tokenizer.decode([int(t)]) for t in ids.reshape(-1)]


def to_string(model: Any, tokens: Any) -> Any:
    """Decode token ids: a string for one sequence (1-D), a list of strings for a batch (2-D); more axes, or an
    id past the vocabulary, is an error."""
    tokenizer = _tokenizer(model)
    ids = checked_ids(model, tokens)
    if ids.dim() == 2:
        return [tokenizer.decode(row.tolist(), clean_up_tokenization_spaces=False) for row in ids]
    return tokenizer.decode(ids.reshape(-1).tolist(), clean_up_tokenization_spaces=False)


@dataclass
class PromptTest:
    """What `test_prompt` printed: per answer token its rank, logit and probability, and the top ``k``."""

    prompt_tokens: list[str]
    answer_tokens: list[str]
    ranks: list[int] = field(default_factory=list)
    logits: list[float] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    top: list[list[tuple[str, float, float]]] = field(default_factory=list)  # (token, logit, prob) per answer token

    def __repr__(self) -> str:
        return f"PromptTest(ranks of the answer tokens: {list(zip(self.answer_tokens, self.ranks))})"


def test_prompt(model: Any, prompt: str, answer: str, prepend_space_to_answer: bool = True,
                print_details: bool = True, prepend_bos: bool | None = True, top_k: int = 10) -> PromptTest:
    """Run ``prompt`` + ``answer`` and show how the model ranks each answer token, as TransformerLens does:
    the tokenized prompt and answer, each answer token's rank, logit and probability, the top ``top_k``
    tokens at its position, and the ranks of all answer tokens (only those with ``print_details=False``).
    Returns the numbers as a `PromptTest`."""
    tokenizer = _tokenizer(model)
    if prepend_space_to_answer and not answer.startswith(" "):
        answer = " " + answer
    prompt_ids = to_tokens(model, prompt, prepend_bos, move_to_device=False)[0]
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty and prepend_bos=False: no token comes before the first answer token, so "
                         "no logits predict it; give a prompt, or prepend_bos=True (the answer is then scored after <bos>)")
    answer_ids = to_tokens(model, answer, prepend_bos=False, move_to_device=False)[0]
    ids = torch.cat([prompt_ids, answer_ids])[None]
    with torch.no_grad():
        logits = model.hf_model(input_ids=ids.to(model.hf_model.device), use_cache=False).logits[0].float().cpu()
    decode = lambda t: tokenizer.decode([int(t)])
    result = PromptTest([decode(t) for t in prompt_ids], [decode(t) for t in answer_ids])
    lines = [f"Tokenized prompt: {result.prompt_tokens}", f"Tokenized answer: {result.answer_tokens}"]
    for j, token in enumerate(answer_ids.tolist()):
        row = logits[len(prompt_ids) + j - 1]
        probs = row.softmax(-1)
        rank = int((row > row[token]).sum())
        values, order = row.topk(top_k)
        result.ranks.append(rank)
        result.logits.append(float(row[token]))
        result.probs.append(float(probs[token]))
        result.top.append([(decode(t), float(v), float(probs[t])) for v, t in zip(values, order)])
        lines.append("Performance on answer token:")
        lines.append(f"Rank: {rank: <8} Logit: {float(row[token]):5.2f} Prob: {float(probs[token]):6.2%} "
                     f"Token: |{decode(token)}|")
        lines += [f"Top {i}th token. Logit: {v:5.2f} Prob: {p:6.2%} Token: |{s}|" for i, (s, v, p) in enumerate(result.top[-1])]
    lines.append(f"Ranks of the answer tokens: {list(zip(result.answer_tokens, result.ranks))}")
    print("\n".join(lines) if print_details else lines[-1])  # TransformerLens prints the ranks either way
    return result


@dataclass(frozen=True)
class Config:
    """TransformerLens' ``model.cfg`` names for a Gemma 3n (read from the stock text config; nothing is copied
    into the model). Gemma 3n extras: ``n_streams`` (AltUp), ``d_ple`` (the per-layer input width),
    ``n_key_value_heads``, ``d_mlp_per_layer`` (MatFormer widths may differ by layer; ``d_mlp`` is the first)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    d_mlp: int
    d_mlp_per_layer: tuple
    n_key_value_heads: int
    n_streams: int
    d_ple: int
    act_fn: str
    normalization_type: str = "RMS"
    positional_embedding_type: str = "rotary"
    final_logit_softcap: float | None = None
    model_name: str = "gemma-3n"

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab


def config(model: Any) -> Config:
    """`Config` of ``model``'s text config."""
    text = model.text_config
    widths = text.intermediate_size if isinstance(text.intermediate_size, (list, tuple)) else \
        [text.intermediate_size] * text.num_hidden_layers
    return Config(n_layers=text.num_hidden_layers, d_model=text.hidden_size, n_heads=text.num_attention_heads,
                  d_head=text.head_dim, d_vocab=text.vocab_size, n_ctx=text.max_position_embeddings,
                  d_mlp=int(widths[0]), d_mlp_per_layer=tuple(int(w) for w in widths),
                  n_key_value_heads=text.num_key_value_heads, n_streams=text.altup_num_inputs,
                  d_ple=text.hidden_size_per_layer_input, act_fn=str(text.hidden_activation),
                  final_logit_softcap=text.final_logit_softcapping)


def to_single_token(model: Any, string: str) -> int:
    """The id of ``string`` when it is exactly one token (no ``<bos>``); an error naming its tokens otherwise."""
    if not isinstance(string, str):
        raise TypeError(f"to_single_token takes a string; got {type(string).__name__}")
    ids = _tokenizer(model)(string, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{string!r} is {len(ids)} tokens ({to_str_tokens(model, ids)}), not one")
    return int(ids[0])


def _encoded(model: Any, input: Any, prepend_bos: bool | None, padding_side: str | None) -> tuple:
    """Token ids and mask for a TransformerLens-style call: texts with ``prepend_bos``/``padding_side`` as
    `to_tokens` takes them, anything else through the one input resolver."""
    if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input)):
        texts = [input] if isinstance(input, str) else list(input)
        if any(not text for text in texts):
            raise ValueError("the input text is empty (''): give at least one character of text, or token ids")
        tokenizer = _tokenizer(model)
        side = tokenizer.padding_side
        if padding_side is not None:
            tokenizer.padding_side = padding_side
        try:
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=prepend_bos is not False)
        finally:
            tokenizer.padding_side = side
        return encoded["input_ids"], encoded["attention_mask"]
    return encode_inputs(model, input)


RETURN_TYPES = ("logits", "loss", "both", None)


def forward(model: Any, input: Any, return_type: str | None = "logits", loss_per_token: bool = False,
            prepend_bos: bool | None = True, padding_side: str | None = None) -> Any:
    """``model(input)`` as TransformerLens runs it: the (soft-capped) logits ``[B, T, V]``, the mean next-token
    cross-entropy (``"loss"``; ``loss_per_token`` gives ``[B, T-1]``), both, or None. Not under ``no_grad``."""
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}; got {return_type!r}")
    if not hasattr(model.hf_model, "lm_head") and return_type is not None:
        raise ValueError(f"a {type(model.hf_model).__name__} has no lm_head, so no logits: trace it and read points")
    ids, mask = _encoded(model, input, prepend_bos, padding_side)
    device = model.hf_model.device
    ids = ids.to(device)
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    logits = model.hf_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if return_type is None:
        return None
    if return_type == "logits":
        return logits
    log_probs = logits[:, :-1].float().log_softmax(-1)
    nll = -log_probs.gather(-1, ids[:, 1:, None])[..., 0]
    real = (mask[:, 1:] * mask[:, :-1]).float()
    loss = nll * real if loss_per_token else (nll * real).sum() / real.sum().clamp(min=1)
    return loss if return_type == "loss" else (logits, loss)


def run_with_cache(model: Any, input: Any, names_filter: Any = None, device: Any = None,
                   remove_batch_dim: bool = False, prepend_bos: bool | None = True,
                   padding_side: str | None = None) -> tuple:
    """``(logits, cache)`` as TransformerLens' ``run_with_cache``: the cache holds every point ``names_filter``
    keeps (None: every point this model has, at every layer; a name, a list of names or a callable of the
    qualified name). The layers' ``input``/``output`` are the AltUp stream stacks ``[S,B,T,D]`` (TL's
    ``hook_resid_pre``/``post`` for a single stream; TransformerLens' own Gemma 3n adapter exposes stream 0,
    ``[B,T,D]``, under that name: take ``cache["layers.3.input"][0]`` for it). ``device`` (default the model's)
    is where the values go; ``remove_batch_dim`` drops a batch of one."""
    if names_filter is None:
        wanted: Any = lambda name: True   # noqa: E731
    elif isinstance(names_filter, str):
        wanted = [names_filter]
    elif callable(names_filter):
        wanted = names_filter
    else:
        wanted = list(names_filter)
    ids, mask = _encoded(model, input, prepend_bos, padding_side)
    inputs = ids if mask is None else {"input_ids": ids, "attention_mask": mask}
    has_logits = hasattr(model.hf_model, "lm_head")
    keep_logits = (lambda name: True) if names_filter is None else wanted
    if has_logits:
        points = (lambda name: name == "logits" or wanted(name)) if callable(wanted) else \
            [*wanted, *([] if "logits" in wanted else ["logits"])]
    else:
        points = wanted
    cache = collect(model, inputs, points, device=device if device is not None else model.hf_model.device,
                    verbose=False)
    logits = cache.get("logits") if has_logits else None
    if has_logits and not (keep_logits("logits") if callable(keep_logits) else "logits" in keep_logits):
        del cache["logits"]
    if remove_batch_dim:
        if ids.shape[0] != 1:
            raise ValueError(f"remove_batch_dim needs a batch of one; this one has {ids.shape[0]} rows")
        for key in list(cache):
            cache[key] = cache[key].squeeze(BY_NAME[split_qualified(key)[1]].batch_axis)
    return logits, cache


def embedding(model: Any) -> torch.Tensor:
    """``W_E``: the stock token-embedding weight ``[V, D]`` itself (before Gemma's √D scale)."""
    return model.injection.text_model.embed_tokens.weight


def unembedding(model: Any) -> torch.Tensor:
    """``W_U``: a ``[D, V]`` view of the stock ``lm_head`` weight (tied to ``W_E``)."""
    head = getattr(model.hf_model, "lm_head", None)
    if head is None:   # a ValueError: an AttributeError from a property would be swallowed by nnsight's __getattr__
        raise ValueError(f"a {type(model.hf_model).__name__} has no lm_head, so no W_U: wrap a "
                         "Gemma3nForConditionalGeneration or Gemma3nForCausalLM to read logits")
    return head.weight.T
