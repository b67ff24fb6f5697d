"""Synthetic Gemma 3n checkpoints: the real file layout with random weights.

Real Gemma 3n weights never reach the machines this project is tested on, so the loader is exercised
on checkpoints written here. They are honest stand-ins:

* the Hugging Face layout: ``config.json``, sharded ``model-0000i-of-0000n.safetensors`` with a
  ``model.safetensors.index.json``, ``generation_config.json`` and tokenizer files;
* tower tensors are present (in shards of their own, as a user deleting them would find them), so
  a text-only load has something to skip; the KV-shared layers carry the k/v tensors real
  checkpoints still carry;
* every parameter is random and non-zero, including the ones Hugging Face initialises to zero
  (``altup.correct_output_scale``) or one (norm scales), so no mechanism passes a test vacuously;
* ``tiny`` keeps the real vocabulary layout scaled down (text ids, then vision soft tokens, then
  audio soft tokens), mixes sliding and full layers, has KV store/reuse layers, sparse early layers
  and per-layer FFN widths; ``e2b``/``e4b`` have the real shapes (the vision tower from a recorded
  name->shape manifest, because building MobileNetV5 needs timm).

The tokenizer is a real ``tokenizers`` byte-level tokenizer with Gemma 3n's special tokens at their
real ids (scaled into the tiny vocabulary where the real id lies past it).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from .._compat import set_attention_implementation
from .._util import atomic_write
from . import module_tree
from .reading import TOWER_PREFIXES
from .towers import build_text_only

PRESETS = ("tiny", "mid", "e2b", "e4b")

_MANIFEST = Path(__file__).parent.parent / "data" / "mobilenetv5_300m_enc.json"

# Gemma 3n's special tokens at their real ids (text part of the vocabulary).
_TEXT_SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 5: "[multimodal]",
                  105: "<start_of_turn>", 106: "<end_of_turn>"}

_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _vocab_layout(text_vocab: int, soft_vocab: int) -> dict[str, int]:
    """Ids of the multimodal markers for a vocabulary of ``text_vocab`` text ids followed by
    ``soft_vocab`` vision and ``soft_vocab`` audio soft tokens (as in the real 262144 + 128 + 128)."""
    vision_offset = text_vocab
    audio_offset = text_vocab + soft_vocab
    real = text_vocab == 262_144
    return {
        "vision_offset": vision_offset,
        "audio_offset": audio_offset,
        "vocab_size": text_vocab + 2 * soft_vocab,
        # boi/boa are ordinary text ids in the real vocabulary (255999, 256000).
        "boi_token_id": 255_999 if real else text_vocab - 2,
        "boa_token_id": 256_000 if real else text_vocab - 1,
        "eoi_token_id": vision_offset,
        "image_token_id": vision_offset + 1,
        "eoa_token_id": audio_offset,
        "audio_token_id": audio_offset + 1,
    }


def preset_config(preset: str = "tiny"):
    """The ``Gemma3nConfig`` of a preset: ``tiny`` (tests), ``mid`` (CPU benchmarks: 12 layers of
    width 512, a 16k text vocabulary), ``e2b`` or ``e4b`` (real shapes)."""
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nTextConfig, Gemma3nVisionConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "tiny":
        ids = _vocab_layout(text_vocab=512, soft_vocab=16)
        layers = 6
        text = dict(
            hidden_size=64, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, hidden_size_per_layer_input=16, laurel_rank=8, sliding_window=8,
            intermediate_size=[128, 96, 128, 96, 128, 160],
            activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                         "sliding_attention", "sliding_attention", "full_attention"],
            num_kv_shared_layers=2, max_position_embeddings=512,
        )
        vision = dict(hidden_size=32)
        audio = dict(hidden_size=32, conf_num_hidden_layers=1, conf_num_attention_heads=2,
                     input_feat_size=16, sscp_conv_channel_size=[8, 8])
    elif preset == "mid":
        ids = _vocab_layout(text_vocab=16_384, soft_vocab=128)
        layers = 12
        text = dict(
            hidden_size=512, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
            head_dim=128, hidden_size_per_layer_input=64, laurel_rank=32, sliding_window=128,
            intermediate_size=[2048] * layers, activation_sparsity_pattern=[0.95] * 4 + [0.0] * (layers - 4),
            layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(layers)],
            num_kv_shared_layers=4, max_position_embeddings=4096,
        )
        vision = dict(hidden_size=64)
        audio = dict(hidden_size=64, conf_num_hidden_layers=1, conf_num_attention_heads=2)
    else:
        ids = _vocab_layout(text_vocab=262_144, soft_vocab=128)
        layers = 30 if preset == "e2b" else 35
        text = dict(
            hidden_size=2048, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
            head_dim=256, hidden_size_per_layer_input=256, laurel_rank=64, sliding_window=512,
            intermediate_size=[8192 if preset == "e2b" else 16384] * layers,
            activation_sparsity_pattern=[0.95] * 10 + [0.0] * (layers - 10),
            layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(layers)],
            num_kv_shared_layers=10 if preset == "e2b" else 15, max_position_embeddings=32_768,
        )
        vision, audio = {}, {}
    soft = 16 if preset == "tiny" else 128
    text_config = Gemma3nTextConfig(
        vocab_size=ids["vocab_size"], vocab_size_per_layer_input=ids["vision_offset"],
        rms_norm_eps=1e-6, final_logit_softcapping=30.0, altup_num_inputs=4, **text,
    )
    vision_config = Gemma3nVisionConfig(vocab_size=soft, vocab_offset=ids["vision_offset"], **vision)
    audio_config = Gemma3nAudioConfig(vocab_size=soft, vocab_offset=ids["audio_offset"], **audio)
    config = Gemma3nConfig(
        text_config=text_config, vision_config=vision_config, audio_config=audio_config,
        **{k: v for k, v in ids.items() if k.endswith("token_id")},
    )
    config.architectures = ["Gemma3nForConditionalGeneration"]
    return config


def build_tokenizer(config):
    """A byte-level tokenizer over ``config``'s vocabulary with Gemma 3n's special tokens in place.

    Ids: the real special tokens (pad 0, eos 1, bos 2, unk 3, mask 4, turn markers 105/106), the
    256 byte symbols after them, boi/boa, then the vision block (eoi, image soft token, …) and the
    audio block (eoa, audio soft token, …); every other id is an ``<unusedN>`` token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab_size = config.text_config.vocab_size
    names: dict[int, str] = dict(_TEXT_SPECIALS)
    names[config.boi_token_id] = "<start_of_image>"
    names[config.boa_token_id] = "<start_of_audio>"
    names[config.eoi_token_id] = "<end_of_image>"
    names[config.image_token_id] = "<image_soft_token>"
    names[config.eoa_token_id] = "<end_of_audio>"
    names[config.audio_token_id] = "<audio_soft_token>"
    byte_symbols = list(ByteLevel.alphabet())
    byte_symbols.sort()
    first_byte_id = 107
    for i, symbol in enumerate(byte_symbols):
        names[first_byte_id + i] = symbol
    vocab = {names.get(i, f"<unused{i}>"): i for i in range(vocab_size)}
    if len(vocab) != vocab_size:
        raise AssertionError("synthetic tokenizer vocabulary has colliding names")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    specials = [names[i] for i in sorted(names) if not (first_byte_id <= i < first_byte_id + 256)]
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>", padding_side="left", chat_template=_CHAT_TEMPLATE,
        model_max_length=config.text_config.max_position_embeddings,
    )


def _checkpoint_shapes(config, preset: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor a real checkpoint of this config holds, with its shape, in checkpoint order."""
    model = build_text_only(config, "meta", stub_audio=False)
    shapes = {k: (v.shape, v.dtype) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    # Real checkpoints still carry k/v projections and norms for KV-shared layers.
    text = config.text_config
    for i in module_tree.kv_sources(text):
        prefix = f"model.language_model.layers.{i}.self_attn."
        kv = text.num_key_value_heads * text.head_dim
        shapes[prefix + "k_proj.weight"] = (torch.Size([kv, text.hidden_size]), torch.float32)
        shapes[prefix + "v_proj.weight"] = (torch.Size([kv, text.hidden_size]), torch.float32)
        shapes[prefix + "k_norm.weight"] = (torch.Size([text.head_dim]), torch.float32)
    vision = {}
    if preset in ("tiny", "mid", "custom"):
        # A small stand-in for MobileNetV5's tensors: tiny cannot build the timm tower either way.
        width = config.vision_config.hidden_size
        vision = {
            "model.vision_tower.timm_model.conv_stem.conv.weight": [width, 3, 3, 3],
            "model.vision_tower.timm_model.conv_stem.bn.weight": [width],
            "model.vision_tower.timm_model.msfa.ffn.pw_proj.conv.weight": [width, width, 1, 1],
        }
    else:
        vision = json.loads(_MANIFEST.read_text())["tensors"]
    for name, shape in vision.items():
        shapes[name] = (torch.Size(shape), torch.float32)
    return shapes


def _random_tensor(name: str, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    values = torch.randn(shape, generator=generator)
    if len(shape) == 1:
        # Norm scales, output scales and biases: around one for scales so signals keep their size,
        # never exactly zero (HF zero-initialises altup.correct_output_scale).
        looks_like_scale = "norm" in name or name.endswith("scale") or name.endswith(".weight")
        return (1.0 + 0.1 * values if looks_like_scale else 0.1 * values).to(dtype)
    if "embed" in name and "projection" not in name:
        return (0.02 * values).to(dtype) if "per_layer" not in name else (0.2 * values).to(dtype)
    if "coefs" in name:
        return (0.3 * values).to(dtype)
    fan_in = math.prod(shape[1:])
    return (values / math.sqrt(fan_in)).to(dtype)


def _component(name: str) -> str:
    """``"vision"``, ``"audio"`` or ``"text"``: which shards a tensor goes into."""
    return next((kind for kind, prefix in TOWER_PREFIXES.items() if name.startswith(prefix)), "text")


def _shards(shapes: dict, max_shard_bytes: int, dtype: torch.dtype) -> list[list[str]]:
    """Group tensor names into shards: text first, each tower in shards of its own."""
    shards: list[list[str]] = []
    for component in ("text", "vision", "audio"):
        current: list[str] = []
        size = 0
        for name, (shape, _) in shapes.items():
            if _component(name) != component:
                continue
            nbytes = math.prod(shape) * dtype.itemsize
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append(name)
            size += nbytes
        if current:
            shards.append(current)
    return shards


def _mix_towers(shards: list[list[str]]) -> list[list[str]]:
    """Move one tensor of each tower into the first text shard and one into the last, as checkpoints
    sharded by size alone have them; the rest keep shards of their own."""
    text = [s for s in shards if _component(s[0]) == "text"]
    towers = [s for s in shards if _component(s[0]) != "text"]
    for destination, source in ((text[0], towers[0]), (text[0], towers[-1]), (text[-1], towers[-1])):
        if len(source) > 1:
            destination.append(source.pop(0))
    return [s for s in shards if s]


def save_checkpoint(
    path: str | os.PathLike,
    preset: Any = "tiny",
    seed: int = 0,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    progress: bool = False,
    mixed_towers: bool = False,
) -> Path:
    """Write a synthetic Gemma 3n checkpoint in the Hugging Face layout; returns its directory.

    ``dtype`` defaults to float32 for ``tiny`` and bfloat16 (the real checkpoints' dtype) for
    ``e2b``/``e4b``. Shards are written one at a time, so memory stays near one shard. ``preset``
    may also be a ``Gemma3nConfig`` (written with the small vision stand-in). Towers get shards of their
    own; ``mixed_towers=True`` also puts some of their tensors into the first and last text shards.
    """
    if isinstance(preset, str):
        config = preset_config(preset)
    else:
        config, preset = copy.deepcopy(preset), "custom"
    small = preset in ("tiny", "mid", "custom")
    dtype = dtype or (torch.float32 if small else torch.bfloat16)
    max_shard_bytes = max_shard_bytes or (2 * 1024**2 if preset == "tiny" else 4 * 1024**3)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    config.save_pretrained(out)
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0, do_sample=False).save_pretrained(out)
    build_tokenizer(config).save_pretrained(out)

    shapes = _checkpoint_shapes(config, preset)
    generator = torch.Generator().manual_seed(seed)
    shards = _shards(shapes, max_shard_bytes, dtype)
    if mixed_towers:
        shards = _mix_towers(shards)
    weight_map: dict[str, str] = {}
    total = 0
    iterator: Iterator[Any] = enumerate(shards, start=1)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(shards), desc=f"writing {preset} shards")
    for index, names in iterator:
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape, native = shapes[name]
            tensors[name] = _random_tensor(name, shape, native, generator).to(
                dtype if native.is_floating_point else native
            )
            total += tensors[name].numel() * tensors[name].element_size()
            weight_map[name] = filename
        atomic_write(out / filename, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        tensors.clear()
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    return out


def default_checkpoint() -> Path:
    """The tiny synthetic checkpoint, made once into a cache directory (``G3N_PROBE_CACHE``)."""
    root = Path(os.environ.get("G3N_PROBE_CACHE", Path.home() / ".cache" / "g3n_probe"))
    target = root / "tiny-seed0"
    if not (target / "model.safetensors.index.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tiny-"))
        save_checkpoint(tmp, "tiny", seed=0)
        try:
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process made it first
    return target


def random_model(preset_or_config: Any = "tiny", *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, attn_implementation: str = "sdpa"):
    """A text-only stock ``Gemma3nForConditionalGeneration`` with random weights, built in memory.

    For benchmarks at real shapes without writing a checkpoint. Towers are stubs; every parameter is
    refilled with the same non-zero random scheme as `save_checkpoint`.
    """
    config = preset_config(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    set_attention_implementation(config, attn_implementation)
    set_attention_implementation(config.get_text_config(), attn_implementation)
    generator = torch.Generator().manual_seed(seed)
    model = build_text_only(config, device, dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "lm_head.weight":
                continue
            param.copy_(_random_tensor(name, param.shape, torch.float32, generator).to(dtype))
    model.tie_weights()
    return model.eval()
