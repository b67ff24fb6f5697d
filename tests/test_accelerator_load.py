"""The accelerator load, proved without an accelerator.

On an accelerator every tensor crosses from the file to the device through the bounded buffers of a
`staging.Staging`, and the per-layer table is read into host storage and never copied to the device.
Here the `Staging` is injected: a recording stand-in on the CPU (so values can be compared with a
plain load) or on the meta device (so nothing lands on the host but the table).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from g3n_probe.checkpoint import module_tree, ple
from g3n_probe.checkpoint.reading import DTYPE_BYTES, keys_read, read_config, tensor_offsets, weight_map
from g3n_probe.checkpoint.staging import Staging, swap_in
from g3n_probe.loading import load_text_model

TABLE_KEY = "model.language_model.embed_tokens_per_layer.weight"
IDS = torch.tensor([[2, 17, 5, 9, 11, 40, 3], [2, 8, 8, 30, 12, 7, 1]])


class Recording(Staging):
    """A stand-in accelerator: records every allocation, every crossing and the buffers in use."""

    def __init__(self, device: str, **kwargs) -> None:
        super().__init__(device, **kwargs)
        self.allocated: list[tuple[int, ...]] = []
        self.uploaded: list[int] = []
        self.in_use = self.most_in_use = 0
        self._lock = threading.Lock()

    def allocate(self, shape, dtype):
        self.allocated.append(tuple(shape))
        return super().allocate(shape, dtype)

    def upload(self, into, piece):
        self.uploaded.append(piece.numel() * piece.element_size())
        super().upload(into, piece)

    def read(self, *args, **kwargs):
        with self._lock:
            self.in_use += 1
            self.most_in_use = max(self.most_in_use, self.in_use)
        try:
            return super().read(*args, **kwargs)
        finally:
            with self._lock:
                self.in_use -= 1


def stored(directory) -> dict[str, tuple[str, list[int], int]]:
    entries = {}
    for key, filename in weight_map(directory).items():
        entries[key] = tensor_offsets(directory / filename)[key]
    return entries


def test_every_tensor_but_the_table_crosses_the_staging_buffers_once(tiny_dir):
    staging = Recording("cpu", slots=2, slot_bytes=64 * 1024)
    model, report = load_text_model(tiny_dir, ple_device="cpu", staging=staging)
    entries = stored(tiny_dir)
    read = [k for k in keys_read(entries, read_config(tiny_dir))[0] if k != TABLE_KEY]
    expected_bytes = sum(math.prod(entries[k][1]) * DTYPE_BYTES[entries[k][0]] for k in read)
    assert sum(staging.uploaded) == expected_bytes, "each non-table tensor crossed exactly once"
    assert sorted(staging.allocated) == sorted(tuple(entries[k][1]) for k in read)
    assert max(staging.uploaded) <= 64 * 1024, "no crossing is larger than one staging buffer"
    assert staging.most_in_use <= 2
    table = module_tree.per_layer_table(model)
    assert tuple(table.weight.shape) not in staging.allocated, "the table never went to the device"
    assert table.weight.is_contiguous() and ple.is_host_resident(table)


def test_the_staged_load_equals_a_plain_load(tiny_dir):
    staged, _ = load_text_model(tiny_dir, ple_device="cpu", staging=Recording("cpu", slot_bytes=64 * 1024))
    plain, _ = load_text_model(tiny_dir, device="cpu")
    for name, value in plain.state_dict().items():
        assert torch.equal(staged.state_dict()[name], value), name
    assert dict(staged.named_buffers()).keys() == dict(plain.named_buffers()).keys()
    for name, value in plain.named_buffers():
        assert torch.equal(dict(staged.named_buffers())[name], value), name
    assert [vars(p) for p in staged.parameters()] == [vars(p) for p in plain.parameters()]
    assert [p.requires_grad for p in staged.parameters()] == [p.requires_grad for p in plain.parameters()]
    with torch.no_grad():
        assert torch.equal(staged(IDS).logits, plain(IDS).logits)


def test_a_dtype_change_happens_in_the_crossing(tiny_dir):
    staged, _ = load_text_model(tiny_dir, dtype=torch.bfloat16, ple_device="cpu",
                                staging=Recording("cpu", slot_bytes=4096))
    plain, _ = load_text_model(tiny_dir, device="cpu", dtype=torch.bfloat16)
    for name, value in plain.state_dict().items():
        assert staged.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(staged.state_dict()[name], value), name


def test_on_a_meta_stand_in_only_the_table_lands_on_the_host(tiny_dir):
    model, _ = load_text_model(tiny_dir, ple_device="cpu", staging=Staging("meta", slots=1, slot_bytes=4096))
    host = {name: p for name, p in model.named_parameters() if p.device.type == "cpu"}
    assert list(host) == [TABLE_KEY]
    from safetensors import safe_open

    entries = stored(tiny_dir)
    filename = weight_map(tiny_dir)[TABLE_KEY]
    with safe_open(str(tiny_dir / filename), "pt") as handle:
        assert torch.equal(host[TABLE_KEY], handle.get_tensor(TABLE_KEY))
    assert math.prod(entries[TABLE_KEY][1]) == host[TABLE_KEY].numel()
    assert all(p.is_meta for name, p in model.named_parameters() if name != TABLE_KEY)
    assert all(b.is_meta for b in model.buffers())


def test_the_tables_buffer_joins_the_host_table():
    """On CUDA transformers puts ``embed_scale`` on the device; the host lookup needs it on the host."""

    table = torch.nn.Embedding(4, 3)
    table.register_buffer("embed_scale", torch.tensor(2.0, dtype=torch.float64), persistent=False)
    host = torch.randn(4, 3, dtype=torch.float64)
    swap_in(table, host)
    assert table.weight.data_ptr() == host.data_ptr() and table.embed_scale.dtype == torch.float64
    assert "embed_scale" in table._buffers and "embed_scale" not in table.state_dict()


def test_staging_refuses_a_size_it_cannot_work_with():
    with pytest.raises(ValueError, match="at least one buffer"):
        Staging("cpu", slots=0)
    with pytest.raises(ValueError, match="at least 8 bytes"):
        Staging("cpu", slot_bytes=2)


def test_the_staging_buffers_are_bounded():
    staging = Staging("cpu", slots=3, slot_bytes=1024)
    buffers = [staging._free.get() for _ in range(3)]
    assert staging._free.empty() and all(b.numel() == 1024 for b in buffers)


def test_pieces_smaller_than_a_row_still_reassemble_the_tensor(tiny_dir):
    staged, _ = load_text_model(tiny_dir, ple_device="cpu", staging=Staging("cpu", slots=1, slot_bytes=12))
    plain, _ = load_text_model(tiny_dir, device="cpu")
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(staged.state_dict()[name], plain.state_dict()[name])
