"""TransformerLens conventions: to_tokens, to_str_tokens, to_string, test_prompt (as TransformerLens prints
it), W_E / W_U (the stock weights, no copies), and model.cache(points=callable) as a names_filter."""

from __future__ import annotations

import re

import pytest
import torch

PROMPT = "def f(x):\n    return x"


def test_to_tokens_to_str_tokens_to_string(probe):
    tokenizer = probe.tokenizer
    ids = probe.to_tokens(PROMPT)
    assert torch.equal(ids, torch.tensor([tokenizer(PROMPT)["input_ids"]]))
    assert int(ids[0, 0]) == tokenizer.bos_token_id
    assert torch.equal(probe.to_tokens(PROMPT, prepend_bos=False), ids[:, 1:])
    batch = probe.to_tokens([PROMPT, "import os"])
    assert batch.shape[0] == 2 and int(batch[1, 0]) == tokenizer.pad_token_id  # padded on the tokenizer's side (left)
    assert int(probe.to_tokens([PROMPT, "import os"], padding_side="right")[1, -1]) == tokenizer.pad_token_id
    assert tokenizer.padding_side == "left"  # restored
    strs = probe.to_str_tokens(PROMPT)
    assert strs[0] == tokenizer.bos_token and "".join(strs[1:]) == PROMPT
    assert probe.to_str_tokens(ids[0]) == strs and probe.to_str_tokens(ids) == [strs]
    assert probe.to_str_tokens([PROMPT, "import os"])[0] == strs
    assert probe.to_str_tokens(ids[0].tolist()) == strs
    assert probe.to_string(ids[0, 1:]) == PROMPT and probe.to_string(ids[:, 1:]) == [PROMPT]


def test_test_prompt_prints_as_transformer_lens_and_its_numbers_are_the_models(probe, capsys):
    result = probe.test_prompt(PROMPT, "x", top_k=3)
    printed = capsys.readouterr().out.splitlines()
    answer = probe.to_str_tokens(" x", prepend_bos=False)  # the tiny tokenizer is character-level: [' ', 'x']
    assert printed[0] == f"Tokenized prompt: {probe.to_str_tokens(PROMPT)}"
    assert printed[1] == f"Tokenized answer: {answer}" and result.answer_tokens == answer
    for j, token in enumerate(answer):  # one block per answer token, as TransformerLens prints it
        block = printed[2 + 5 * j:7 + 5 * j]
        assert block[0] == "Performance on answer token:"
        assert re.fullmatch(rf"Rank: {result.ranks[j]: <8} Logit: +-?\d+\.\d\d Prob: +\d+\.\d\d% Token: \|{re.escape(token)}\|",
                            block[1])
        assert [line.split(".")[0] for line in block[2:]] == ["Top 0th token", "Top 1th token", "Top 2th token"]
    assert printed[-1] == f"Ranks of the answer tokens: {list(zip(answer, result.ranks))}"
    ids = probe.to_tokens(PROMPT + " x")
    with torch.no_grad():
        logits = probe.hf_model(input_ids=ids).logits[0]
    for j in range(len(answer)):
        row, token = logits[ids.shape[1] - len(answer) - 1 + j], ids[0, ids.shape[1] - len(answer) + j]
        assert result.ranks[j] == int((row > row[token]).sum())
        assert result.probs[j] == pytest.approx(float(row.softmax(-1)[token]))
        assert result.top[j][0][1] == pytest.approx(float(row.max()))
    quiet = probe.test_prompt(PROMPT, "x", print_details=False)
    assert capsys.readouterr().out.splitlines() == printed[-1:] and quiet.ranks == result.ranks  # the ranks only


def test_W_E_and_W_U_are_the_stock_weights(probe):
    embed = probe.hf_model.model.language_model.embed_tokens.weight
    assert probe.W_E is embed
    assert probe.W_U.shape == (embed.shape[1], embed.shape[0])
    assert probe.W_U.data_ptr() == probe.hf_model.lm_head.weight.data_ptr()  # a view, no copy
    assert torch.equal(probe.W_U, probe.hf_model.lm_head.weight.T)
    ids = probe.to_tokens(PROMPT)
    with torch.no_grad(), probe.trace(ids):
        embedded = probe.embed.output.save()
    scale = probe.hf_model.model.language_model.embed_tokens.embed_scale
    assert torch.equal(embedded, probe.W_E[ids] * scale.to(embedded.dtype))


def test_cache_takes_a_names_filter(probe, ids):
    by_filter = probe.cache(ids, points=lambda name: name.endswith("mlp_out") or name == "embed", verbose=False)
    by_names = probe.cache(ids, points=["embed", "mlp_out"], verbose=False)
    assert list(by_filter) == list(by_names) and all(torch.equal(by_filter[k], by_names[k]) for k in by_names)
    every = probe.cache(ids, points=lambda name: True, layers=[4], verbose=False)
    assert "layers.4.output" in every and "logits" in every
    assert "layers.4.attn_pattern" not in every  # sdpa: never fires, so never offered
    assert "layers.4.attn_k" not in every  # a KV-reuse layer has no keys of its own
    with pytest.raises(ValueError, match="kept no point"):
        probe.cache(ids, points=lambda name: False)
