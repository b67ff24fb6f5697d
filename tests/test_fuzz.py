"""Seeded fuzzing of the loader and the dataset cache: every corrupted checkpoint is a clear error or a
harmless change, and every damaged shard is recomputed, never accepted. The outcome counts are printed
(``pytest -s``) and are the README's reliability table."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import g3n_probe as g3n
from g3n_probe.checkpoint import CheckpointError

SEED, CASES = 1234, 80
CLEAR = (CheckpointError, FileNotFoundError, ValueError, TypeError)
POSITIVE = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
            "vocab_size_per_layer_input", "hidden_size_per_layer_input", "altup_num_inputs", "laurel_rank"]
BAD_VALUES = [-1, 0, "7", 2.5, None, [], {}, 10**7, True]


def _mutate(rng: random.Random, ckpt: Path) -> tuple[str, str, str | None]:
    """Corrupt one thing in ``ckpt``; return a label of what kind, the file changed and the key changed (or None)."""
    changed_key = None
    kind = rng.choice(["config value", "config truncated", "index entry", "index structure", "index key",
                       "shard truncated", "shard header byte", "tokenizer truncated"])
    index_file = ckpt / "model.safetensors.index.json"
    if kind == "config value":
        config = json.loads((ckpt / "config.json").read_text())
        key = rng.choice(POSITIVE + ["altup_active_idx", "num_kv_shared_layers", "layer_types", "intermediate_size"])
        config["text_config"][key] = rng.choice(BAD_VALUES)
        (ckpt / "config.json").write_text(json.dumps(config))
        changed_key = key
    elif kind == "config truncated":
        text = (ckpt / "config.json").read_text()
        (ckpt / "config.json").write_text(text[: rng.randrange(len(text) - 1)])
    elif kind == "index entry":
        index = json.loads(index_file.read_text())
        key = changed_key = rng.choice(sorted(index["weight_map"]))
        index["weight_map"][key] = rng.choice(["../outside.safetensors", "/etc/hostname", "", 5, None,
                                               "missing.safetensors",
                                               rng.choice(sorted(set(index["weight_map"].values())))])
        index_file.write_text(json.dumps(index))
    elif kind == "index structure":
        index = json.loads(index_file.read_text())
        index["weight_map"] = rng.choice([["a"], "model.safetensors", 3, None])
        index_file.write_text(json.dumps(index) if rng.random() < 0.7 else json.dumps(index)[:40])
    elif kind == "index key":
        index = json.loads(index_file.read_text())
        text_keys = sorted(k for k in index["weight_map"] if k.startswith("model.language_model."))
        if rng.random() < 0.5:
            changed_key = rng.choice(text_keys)
            del index["weight_map"][changed_key]
        else:
            changed_key = f"model.language_model.layers.0.extra{rng.randrange(99)}.weight"
            index["weight_map"][changed_key] = index["weight_map"][text_keys[0]]
        index_file.write_text(json.dumps(index))
    elif kind == "shard truncated":
        shard = rng.choice(sorted(ckpt.glob("*.safetensors")))
        data = shard.read_bytes()
        shard.write_bytes(data[: rng.randrange(len(data))])
        return kind, shard.name, None
    elif kind == "shard header byte":
        shard = rng.choice(sorted(ckpt.glob("*.safetensors")))
        data = bytearray(shard.read_bytes())
        header = int.from_bytes(data[:8], "little")
        at = rng.randrange(0, 8 + header)
        data[at] = (data[at] + rng.randrange(1, 256)) % 256
        shard.write_bytes(bytes(data))
        return kind, shard.name, None
    else:
        text = (ckpt / "tokenizer.json").read_text()
        (ckpt / "tokenizer.json").write_text(text[: rng.randrange(len(text) - 1)])
        return kind, "tokenizer.json", None
    return kind, ("config.json" if kind.startswith("config") else index_file.name), changed_key


def test_fuzz_the_loader(tiny_dir, tmp_path, capsys):
    reference = g3n.load(tiny_dir)
    ids = torch.tensor([[2, 50, 60, 7, 9, 10, 11, 12]])
    with reference.trace(ids):
        expected = reference.logits.output.save()
    rng = random.Random(SEED)
    outcomes: Counter = Counter()
    for case in range(CASES):
        ckpt = Path(shutil.copytree(tiny_dir, tmp_path / f"case{case}"))
        kind, file, key = _mutate(rng, ckpt)
        try:
            model = g3n.load(ckpt)
        except CLEAR as error:
            # The README's promise: the error names the file, and the key where there is one.
            message = str(error)
            assert file in message, f"case {case} ({kind}): the error does not name {file}: {message}"
            assert key is None or key in message, f"case {case} ({kind}): the error does not name {key!r}: {message}"
            outcomes[(kind, "clear error")] += 1
            continue
        except Exception as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case} ({kind}): {type(error).__name__} is not a clear error: {error}")
        with model.trace(ids):
            logits = model.logits.output.save()
        assert torch.equal(logits, expected), f"case {case} ({kind}) loaded silently with different logits"
        outcomes[(kind, "harmless: identical logits")] += 1
        shutil.rmtree(ckpt)
    with capsys.disabled():
        print("\nloader fuzz outcomes:", dict(sorted(outcomes.items())))
    assert sum(outcomes.values()) == CASES


def test_fuzz_the_cache(probe, tmp_path, capsys):
    texts = ["def f(x):", "import os", "class A:", "x = 1", "print(1)", "for i in y:"]
    reference = g3n.cache_dataset(probe, texts, ["layers.1.ple_out"], tmp_path / "reference", batch_size=2,
                                  progress=False)
    rng = random.Random(SEED)
    outcomes: Counter = Counter()
    for case in range(12):
        out = Path(shutil.copytree(tmp_path / "reference", tmp_path / f"case{case}"))
        victim = out / reference[rng.randrange(len(reference))].name
        kind = rng.choice(["byte flipped", "truncated", "record removed", "record garbled", "replaced by garbage"])
        if kind == "byte flipped":
            data = bytearray(victim.read_bytes())
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
            victim.write_bytes(bytes(data))
        elif kind == "truncated":
            victim.write_bytes(victim.read_bytes()[: rng.randrange(victim.stat().st_size)])
        elif kind == "record removed":
            victim.with_name(victim.name + ".json").unlink()
        elif kind == "record garbled":
            victim.with_name(victim.name + ".json").write_text("{")
        else:
            victim.write_bytes(bytes(rng.randrange(256) for _ in range(200)))
        with pytest.warns(UserWarning, match=f"{victim.name} .*recomputing it"):
            paths = g3n.cache_dataset(probe, texts, ["layers.1.ple_out"], out, batch_size=2, progress=False)
        for ours, theirs in zip(paths, reference):
            mine, expected = load_file(str(ours)), load_file(str(theirs))
            assert mine.keys() == expected.keys() and all(torch.equal(mine[k], expected[k]) for k in mine)
        outcomes[(kind, "recomputed")] += 1
    with capsys.disabled():
        print("\ncache fuzz outcomes:", dict(sorted(outcomes.items())))
