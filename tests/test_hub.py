"""From a hub id to the first trace: fetching only the bytes the text path reads (`g3n_probe.hub`).

A local server (`hubserver.FakeHub`) stands in for the hub; no test touches the network. Its
checkpoint has towers in shards of their own *and* tower tensors inside text shards, plus the k/v
tensors of KV-shared layers, which the loader skips too.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch

import g3n_probe as g3n
from g3n_probe.checkpoint import synthetic
from g3n_probe.checkpoint.reading import CheckpointError, is_text_key, keys_read, read_config
from g3n_probe.cli import main as cli
from g3n_probe.hub import cache_layout, fetching
from g3n_probe.hub import http as hub_http
from hubserver import FakeHub

REPO = "g3n-test/tiny-gemma-3n"
IDS = torch.tensor([[2, 17, 5, 9, 11, 40, 3]])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """The tiny checkpoint in five shards: three text (two of them also holding tower tensors), two tower-only."""
    return synthetic.save_checkpoint(tmp_path_factory.mktemp("hub") / "tiny", "tiny", seed=0,
                                     max_shard_bytes=600_000, mixed_towers=True)


@pytest.fixture
def server(monkeypatch, tmp_path, mixed):
    """The fake hub, made the endpoint; both caches empty and private to this test; no token, online."""
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("G3N_PROBE_CACHE", str(tmp_path / "g3n-cache"))
    close_session()   # a client made before NO_PROXY was set would still route 127.0.0.1 through a proxy
    with FakeHub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
        fake.add(REPO, mixed)
        yield fake
    close_session()


def tower_byte_ranges(directory: Path) -> dict[str, list[tuple[int, int]]]:
    """Per shard, the absolute byte ranges of every tensor the text path does not read."""
    config = read_config(directory)
    mapping = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    read = set(keys_read(mapping, config)[0])
    ranges: dict[str, list[tuple[int, int]]] = {}
    for shard in sorted(set(mapping.values())):
        raw = (directory / shard).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + length])
        ranges[shard] = [(8 + length + e["data_offsets"][0], 8 + length + e["data_offsets"][1])
                         for k, e in header.items() if k != "__metadata__" and k not in read]
    return ranges


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.hf_model(IDS).logits


def test_the_fixture_mixes_towers_into_text_shards(mixed):
    mapping = json.loads((mixed / "model.safetensors.index.json").read_text())["weight_map"]
    kinds: dict[str, set[str]] = {}
    for key, shard in mapping.items():
        kinds.setdefault(shard, set()).add("text" if is_text_key(key) else "tower")
    assert sum(k == {"text", "tower"} for k in kinds.values()) == 2
    assert sum(k == {"tower"} for k in kinds.values()) == 2
    assert sum(k == {"text"} for k in kinds.values()) == 1


def test_load_by_hub_id_fetches_no_tower_byte_and_equals_a_load_from_disk(server, mixed, tmp_path):
    model = g3n.load(REPO)
    assert torch.equal(logits(model), logits(g3n.load(mixed)))
    assert model.tokenizer is not None
    assert model.load_report.source.parent.name == "snapshots"
    assert str(model.load_report.source).startswith(str(tmp_path / "g3n-cache" / "hub"))

    towers = tower_byte_ranges(mixed)
    requested = {shard for _, shard, _, _ in server.log}
    untouched = {shard for shard, spans in towers.items() if spans} - requested
    assert len(untouched) == 2, "the tower-only shards are never requested, not even their headers"
    for shard, spans in towers.items():
        for start, end in server.served(REPO, shard):
            overlap = [(a, b) for a, b in spans if a < end and start < b]
            assert not overlap, f"{shard}: bytes {start}..{end} include tower/KV-shared bytes {overlap}"
    # Exactly the text path's bytes: every text tensor byte once, plus headers.
    mapping = json.loads((mixed / "model.safetensors.index.json").read_text())["weight_map"]
    read = keys_read(mapping, read_config(mixed))[0]
    weight_bytes = sum(end - start for _, shard, start, end in server.log
                       if shard.endswith(".safetensors") and end - start > 4096)
    with torch.no_grad():
        text_bytes = sum(t.numel() * t.element_size() for k, t in _tensors(mixed).items() if k in read)
    assert text_bytes <= weight_bytes < text_bytes + 64 * 1024


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in directory.glob("*.safetensors"):
        out.update(load_file(shard))
    return out


def test_second_load_uses_the_cache_with_one_small_request(server):
    g3n.load(REPO)
    before = len(server.log)
    report = fetching.fetch(REPO, progress=False)
    assert report.cached and report.bytes_fetched == 0
    assert len(server.log) == before, "no file is read again (only the model-info request)"


def test_a_cut_connection_resumes_where_it_stopped_in_the_same_call(server, mixed):
    whole = fetching.fetch(REPO, cache_dir=Path(server.repos[REPO].directory).parent / "reference", progress=False)
    shard = whole.files_whole[0]
    server.log.clear()
    server.cuts[shard] = [100_000]
    report = fetching.fetch(REPO, progress=False)
    spans = server.served(REPO, shard)
    assert spans[0][0] == 0 and spans[1][0] == 100_000, spans
    assert report.bytes_fetched == whole.bytes_fetched, "every byte arrived once"
    assert (report.path / shard).read_bytes() == (mixed / shard).read_bytes()


def test_an_interrupted_fetch_is_never_loaded_and_the_next_call_resumes(server, mixed, monkeypatch):
    monkeypatch.setattr(hub_http.time, "sleep", lambda s: None)
    ranged = "model-00001-of-00005.safetensors"
    server.cuts[ranged] = [50_000] * 3 + [0] * hub_http.ATTEMPTS   # progress, then a dead connection
    with pytest.raises(fetching.FetchError, match="run again to resume"):
        fetching.fetch(REPO, progress=False)
    assert fetching.cached_checkpoint(REPO) is None
    with pytest.raises(FileNotFoundError, match="download=False"):
        g3n.load(REPO, download=False)
    served_before = len(server.served(REPO, ranged))
    report = fetching.fetch(REPO, progress=False)
    assert report.resumed_from >= 150_000
    first_piece = server.served(REPO, ranged)[2][0]   # after the two header reads
    resumed = server.served(REPO, ranged)[served_before:][-1][0]
    assert resumed == first_piece + 150_000, "the next call starts where the last one stopped"
    assert torch.equal(logits(g3n.load(REPO, download=False)), logits(g3n.load(mixed)))


def test_offline_uses_only_the_cache_and_says_where_it_looked(server, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as error:
        g3n.load(REPO)
    message = str(error.value)
    assert REPO in message and "HF_HUB_OFFLINE" in message
    assert str(tmp_path / "g3n-cache" / "hub") in message and str(tmp_path / "hf-cache") in message
    assert server.log == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fetching.fetch(REPO, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = len(server.log)
    for options in ({}, {"local_files_only": True}, {"download": False, "revision": "main"}):
        assert g3n.load(REPO, **options).load_report.source == fetching.cached_checkpoint(REPO)
    assert len(server.log) == requests


def test_a_full_snapshot_in_the_hugging_face_cache_is_used_without_the_network(server, mixed, tmp_path):
    from huggingface_hub import constants

    snapshot = Path(constants.HF_HUB_CACHE) / ("models--" + REPO.replace("/", "--")) / "snapshots" / ("a" * 40)
    shutil.copytree(mixed, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    model = g3n.load(REPO, download=False)
    assert model.load_report.source == snapshot
    assert server.log == []


def test_gated_repository_without_access_says_how_to_get_it(server, monkeypatch):
    server.repos[REPO].token = "hf_secret"
    with pytest.raises(fetching.HubAccessError) as error:
        g3n.load(REPO)
    message = str(error.value)
    assert "gated" in message and "401" in message and "license" in message and "HF_TOKEN" in message
    with pytest.raises(fetching.HubAccessError, match="403"):
        g3n.load(REPO, token="hf_someone_else")
    assert server.log == [], "not a byte served"
    assert not (fetching.cache_root() / f"models--{REPO.replace('/', '--')}" / "partial").exists() or \
        not any((fetching.cache_root() / f"models--{REPO.replace('/', '--')}" / "partial").iterdir())
    assert g3n.load(REPO, token="hf_secret").tokenizer is not None
    assert not server.cdn_saw_authorization, "the token never goes to the CDN the hub redirects to"
    shutil.rmtree(fetching.cache_root())
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert g3n.load(REPO).tokenizer is not None


def test_unknown_repository_and_revision_are_named(server):
    with pytest.raises(FileNotFoundError, match="g3n-test/nothing-here") as error:
        g3n.load("g3n-test/nothing-here")   # anonymous: the hub answers 401 RepoNotFound
    assert "license" not in str(error.value) and "check the id" in str(error.value)
    with pytest.raises(FileNotFoundError, match="revision"):
        g3n.load(REPO, revision="no-such-branch")


@pytest.mark.parametrize(("source", "options", "match"), [
    ("g3n-test/a--b", {}, "not a valid hub id"),
    (REPO, {"revision": ".."}, "not a branch, tag or commit"),
    (REPO, {"revision": ""}, "not a branch, tag or commit"),
    (REPO, {"revision": 3}, "revision must be a branch, tag or commit as a string"),
])
def test_bad_names_are_refused_before_any_request(server, source, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        g3n.load(source, **options)
    assert server.log == []


def test_a_pinned_commit_is_fetched_and_found_offline(server, monkeypatch):
    commit = server.repos[REPO].commit
    assert fetching.fetch(REPO, commit, progress=False).commit == commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert g3n.load(REPO, revision=commit).load_report.source.name == commit


def test_not_gemma_3n_is_refused_before_any_weight_byte(server, tmp_path, mixed):
    other = tmp_path / "llama"
    shutil.copytree(mixed, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    server.add("g3n-test/llama", other)
    with pytest.raises(CheckpointError, match="not a Gemma 3n"):
        g3n.load("g3n-test/llama")
    assert {name for _, name, _, _ in server.log} == {"config.json"}


def test_pickle_only_repository_is_refused_without_a_download(server, tmp_path, mixed):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(mixed / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    server.add("g3n-test/pickled", pickled)
    with pytest.raises(CheckpointError, match="never unpickles"):
        g3n.load("g3n-test/pickled")
    assert server.log == []


def test_a_server_that_ignores_ranges_is_named(server):
    server.ignore_ranges = True
    with pytest.raises(fetching.FetchError, match="not 206"):
        fetching.fetch(REPO, progress=False)


def test_single_file_checkpoint_is_fetched_as_text_ranges(server, tmp_path, mixed):
    from safetensors.torch import save_file

    single = tmp_path / "single"
    single.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(mixed / name, single)
    save_file(_tensors(mixed), single / "model.safetensors", metadata={"format": "pt"})
    server.add("g3n-test/single", single)
    report = fetching.fetch("g3n-test/single", progress=False)
    assert report.files_ranged == ["model.safetensors"]
    towers = {k for k in _tensors(single) if not is_text_key(k)}
    assert towers and not towers & set(_tensors(report.path))
    assert torch.equal(logits(g3n.load("g3n-test/single")), logits(g3n.load(mixed)))


def test_cli_fetch_prints_bytes_against_the_full_snapshot(server, capsys):
    assert cli(["fetch", REPO]) == 0
    out = capsys.readouterr().out
    assert "of the full snapshot" in out and "never requested" in out
    assert cli(["info", REPO, "--offline"]) == 0
    assert cli(["fetch", "g3n-test/nothing-here"]) == 2
    assert "g3n-test/nothing-here" in capsys.readouterr().out


def test_network_down_falls_back_to_the_cache_with_a_warning(server, monkeypatch):
    from huggingface_hub import constants

    fetching.fetch(REPO, progress=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")   # nothing listens there
    monkeypatch.setattr(hub_http.time, "sleep", lambda s: None)
    with pytest.warns(UserWarning, match="using the cached text-only checkpoint"):
        assert g3n.load(REPO).load_report.source == fetching.cached_checkpoint(REPO)


def test_a_stalled_connection_times_out_and_resumes(server, monkeypatch, mixed):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)
    monkeypatch.setattr(hub_http.time, "sleep", lambda s: None)
    shard = "model-00002-of-00005.safetensors"   # text only: fetched whole
    server.stalls[shard] = [100_000]
    report = fetching.fetch(REPO, progress=False)
    assert [start for start, _ in server.served(REPO, shard)] == [0, 100_000]
    assert (report.path / shard).read_bytes() == (mixed / shard).read_bytes()


def test_busy_server_is_waited_for_as_it_asks(server, monkeypatch):
    waits = []
    monkeypatch.setattr(hub_http.time, "sleep", waits.append)
    server.busy = 2
    fetching.fetch(REPO, progress=False)
    assert waits == [1.0, 1.0], "Retry-After is honoured"


def test_a_new_commit_reuses_unchanged_shards(server, mixed):
    first = fetching.fetch(REPO, progress=False)
    served = len(server.log)
    server.add(REPO, mixed)   # a new commit, same files (say, a model-card edit)
    second = fetching.fetch(REPO, progress=False)
    assert second.commit != first.commit
    assert sorted(second.files_reused) == sorted(first.files_whole + first.files_ranged)
    shards = [entry for entry in server.log[served:] if entry[1].endswith(".safetensors")]
    assert shards == [], "no shard byte fetched again"
    assert (second.path / first.files_whole[0]).stat().st_ino == (first.path / first.files_whole[0]).stat().st_ino
    assert torch.equal(logits(g3n.load(REPO)), logits(g3n.load(mixed)))


def test_a_shard_that_arrives_corrupt_is_not_kept(server, tmp_path, mixed):
    bad = tmp_path / "bad"
    shutil.copytree(mixed, bad)
    shard = bad / "model-00002-of-00005.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8] = ord("X")   # the header is no longer JSON; the size is unchanged
    shard.write_bytes(bytes(raw))
    server.add("g3n-test/bad", bad)
    with pytest.raises(CheckpointError, match="arrived complete but is not a valid safetensors file"):
        fetching.fetch("g3n-test/bad", progress=False)
    assert not list(fetching.cache_root().glob("models--g3n-test--bad/partial/*/*.incomplete"))


def test_info_and_points_fetch_only_the_config(server, capsys):
    assert cli(["points", REPO]) == 0
    assert cli(["info", REPO]) == 0
    assert {name for _, name, _, _ in server.log} <= {"config.json", "model.safetensors.index.json"}
    assert "weights not fetched" in capsys.readouterr().out


def test_a_tower_of_a_text_only_fetch_says_why_it_is_missing(server):
    model = g3n.load(REPO)
    with pytest.raises(g3n.TowerNotLoadedError, match="text-only fetch of g3n-test/tiny-gemma-3n"):
        model.load_tower("audio")


# --- nothing silently wrong: fetched bytes checked by content (issue 21) ----------------------------

@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """Another model of the very same layout (other weights): what a server switching bytes would send."""
    return synthetic.save_checkpoint(tmp_path_factory.mktemp("hub-other") / "tiny", "tiny", seed=1,
                                     max_shard_bytes=600_000, mixed_towers=True)


WHOLE = "model-00002-of-00005.safetensors"    # text only: fetched whole
RANGED = "model-00001-of-00005.safetensors"   # text and towers: fetched as byte ranges


def _partial(commit: str) -> Path:
    return fetching.cache_root() / f"models--{REPO.replace('/', '--')}" / "partial" / commit


def _same_tensors(fetched: Path, original: Path) -> bool:
    from safetensors.torch import load_file

    mine, theirs = load_file(fetched), load_file(original)
    return bool(mine) and all(torch.equal(tensor, theirs[key]) for key, tensor in mine.items())


def _with_header(source: Path, target: Path, shard: str, edit) -> Path:
    """A copy of ``source`` whose ``shard`` has its safetensors header JSON changed by ``edit``."""
    shutil.copytree(source, target)
    raw = (target / shard).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    (target / shard).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    return target


@pytest.mark.parametrize(("name", "offset", "what"), [(WHOLE, 300_000, "sha256"), ("tokenizer.json", 1000, "git blob id")])
def test_a_changed_byte_at_the_same_size_is_caught_and_refetched(server, mixed, name, offset, what):
    server.flips[name] = offset
    with pytest.raises(fetching.ContentError, match=f"{name}: the bytes that arrived") as error:
        fetching.fetch(REPO, progress=False)
    assert what in str(error.value) and "next call fetches" in str(error.value)
    partial = _partial(server.repos[REPO].commit)
    assert not (partial / name).exists() and not (partial / (name + ".incomplete")).exists()
    assert fetching.cached_checkpoint(REPO) is None
    server.flips.clear()
    report = fetching.fetch(REPO, progress=False)
    assert (report.path / name).read_bytes() == (mixed / name).read_bytes()


def test_another_models_bytes_under_the_listed_commit_are_refused(server, mixed, other):
    server.repos[REPO].serve = other   # the listing still describes `mixed`
    with pytest.raises(fetching.ContentError, match="not the file the listing names"):
        fetching.fetch(REPO, progress=False)
    partial = _partial(server.repos[REPO].commit)
    assert not (partial / RANGED).exists(), "a shard rebuilt from the same server's ranges is not trusted either"
    server.repos[REPO].serve = None
    report = fetching.fetch(REPO, progress=False)
    for shard in (WHOLE, RANGED):
        assert _same_tensors(report.path / shard, mixed / shard)


def test_a_ranged_answer_from_a_file_of_another_size_is_refused(server, mixed, tmp_path):
    longer = tmp_path / "longer"
    shutil.copytree(mixed, longer)
    with open(longer / RANGED, "ab") as f:   # the same header and tensors, then more: Content-Range says so
        f.write(bytes(1000))
    server.repos[REPO].serve = longer
    with pytest.raises(fetching.FetchError, match=f"{RANGED}: the hub lists .* bytes, the server answered from a file of"):
        fetching.fetch(REPO, progress=False)


@pytest.mark.parametrize("shard", [WHOLE, RANGED])
def test_a_flipped_bit_in_a_leftover_incomplete_file_is_not_resumed_from(server, mixed, monkeypatch, shard):
    monkeypatch.setattr(hub_http.time, "sleep", lambda s: None)
    server.cuts[shard] = [100_000] + [0] * hub_http.ATTEMPTS
    with pytest.raises(fetching.FetchError, match="run again to resume"):
        fetching.fetch(REPO, progress=False)
    leftover = _partial(server.repos[REPO].commit) / (shard + ".incomplete")
    with open(leftover, "r+b") as f:   # one bit, in bytes the journal vouches for
        f.seek(60_000)
        byte = f.read(1)[0]
        f.seek(60_000)
        f.write(bytes([byte ^ 0x10]))
    with pytest.warns(UserWarning, match="differ from what was fetched into it"):
        report = fetching.fetch(REPO, progress=False)
    assert _same_tensors(report.path / shard, mixed / shard)


def test_a_flipped_bit_in_an_unjournalled_leftover_is_caught_by_the_listed_hash(server, mixed, monkeypatch):
    monkeypatch.setattr(hub_http.time, "sleep", lambda s: None)
    server.cuts[WHOLE] = [100_000] + [0] * hub_http.ATTEMPTS
    with pytest.raises(fetching.FetchError):
        fetching.fetch(REPO, progress=False)
    leftover = _partial(server.repos[REPO].commit) / (WHOLE + ".incomplete")
    (leftover.parent / (leftover.name + ".sha256")).unlink()   # say, written by a process killed at once
    raw = bytearray(leftover.read_bytes())
    raw[60_000] ^= 0x10
    leftover.write_bytes(bytes(raw))
    with pytest.raises(fetching.ContentError, match=f"{WHOLE}: the bytes that arrived hash to sha256"):
        fetching.fetch(REPO, progress=False)
    assert not leftover.exists()
    assert (fetching.fetch(REPO, progress=False).path / WHOLE).read_bytes() == (mixed / WHOLE).read_bytes()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_file_of_an_earlier_snapshot_is_not_reused(server, mixed, damage):
    first = fetching.fetch(REPO, progress=False)
    old = first.path / WHOLE
    raw = bytearray(old.read_bytes())
    if damage == "flip":
        raw[300_000] ^= 0x01
    with open(old, "r+b") as f:   # in place, as disk damage would be
        f.write(bytes(raw[:-1000] if damage == "truncate" else raw))
        f.truncate()
    server.add(REPO, mixed)   # a new commit, same files
    with pytest.warns(UserWarning, match="damaged, so it is fetched instead of used"):
        second = fetching.fetch(REPO, progress=False)
    assert WHOLE not in second.files_reused and RANGED in second.files_reused
    assert (second.path / WHOLE).stat().st_ino != old.stat().st_ino
    assert (second.path / WHOLE).read_bytes() == (mixed / WHOLE).read_bytes()


def test_overlapping_tensors_in_a_remote_header_are_refused_as_the_loader_refuses_them(server, mixed, tmp_path):
    def share(header):
        config = read_config(mixed)
        read = set(keys_read(header, config)[0])
        by_size: dict[int, list[str]] = {}
        for key, entry in header.items():
            if key in read:
                by_size.setdefault(entry["data_offsets"][1] - entry["data_offsets"][0], []).append(key)
        first, second = next(keys for keys in by_size.values() if len(keys) > 1)[:2]
        header[second]["data_offsets"] = header[first]["data_offsets"]

    bad = _with_header(mixed, tmp_path / "overlap", RANGED, share)
    with pytest.raises(CheckpointError, match=RANGED):
        g3n.load(bad)   # safetensors refuses it on open
    server.add("g3n-test/overlap", bad)
    with pytest.raises(CheckpointError, match="share bytes"):
        fetching.fetch("g3n-test/overlap", progress=False)
    assert all(end - start < 64 * 1024 for _, _, start, end in server.log), "no tensor byte was fetched"


def _negative_dims(header):
    key = next(k for k, e in header.items() if k.startswith("model.language_model.") and len(e.get("shape", [])) == 2)
    header[key]["shape"] = [-d for d in header[key]["shape"]]   # the same product, so the sizes still add up


def _string_dims(header):
    key = next(k for k, e in header.items() if k.startswith("model.language_model.") and len(e.get("shape", [])) == 2)
    header[key]["shape"] = [str(d) for d in header[key]["shape"]]


def _metadata_not_strings(header):
    header["__metadata__"] = {"format": 1}


@pytest.mark.parametrize("edit", [_negative_dims, _string_dims, _metadata_not_strings])
def test_a_malformed_header_entry_is_refused_before_its_ranges_and_not_called_transient(server, mixed, tmp_path, edit):
    bad = _with_header(mixed, tmp_path / "malformed", RANGED, edit)
    with pytest.raises(CheckpointError):
        g3n.load(bad)
    server.add("g3n-test/malformed", bad)
    with pytest.raises(CheckpointError, match=RANGED) as error:
        fetching.fetch("g3n-test/malformed", progress=False)
    assert "again" not in str(error.value), "not transient: another run repeats it"
    assert all(end - start < 64 * 1024 for _, _, start, end in server.log), "no tensor byte was fetched"


@pytest.mark.parametrize("name", [["model-00001.safetensors"], 7, None, {"file": "x"}])
def test_an_index_naming_a_shard_by_something_not_a_file_name_is_refused(server, mixed, tmp_path, name):
    odd = tmp_path / "odd"
    shutil.copytree(mixed, odd)
    index = json.loads((odd / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (odd / "model.safetensors.index.json").write_text(json.dumps(index))
    server.add("g3n-test/odd", odd)
    with pytest.raises(CheckpointError, match="not a valid safetensors index: weight_map names a shard"):
        fetching.fetch("g3n-test/odd", progress=False)
    assert all(end - start < 64 * 1024 for _, _, start, end in server.log), "no tensor byte was fetched"


def test_a_mixed_shard_named_like_a_tokenizer_file_is_planned_by_its_content(server, mixed, tmp_path):
    renamed = tmp_path / "renamed"
    shutil.copytree(mixed, renamed)
    name = "tokenizer-00001.safetensors"
    (renamed / RANGED).rename(renamed / name)
    index = json.loads((renamed / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: name if f == RANGED else f for k, f in index["weight_map"].items()}
    (renamed / "model.safetensors.index.json").write_text(json.dumps(index))
    server.add("g3n-test/renamed", renamed)
    report = fetching.fetch("g3n-test/renamed", progress=False)
    assert name in report.files_ranged
    size = (renamed / name).stat().st_size
    assert (0, size) not in server.served("g3n-test/renamed", name), "never fetched whole, tower bytes included"
    assert _same_tensors(report.path / name, renamed / name)


# --- no link followed out of the cache ---------------------------------------------------------------

def _plant(where: str, server, mixed, tmp_path) -> tuple[Path, Path]:
    """A symbolic link at ``where`` in the cache; (the link, what it points at)."""
    commit = server.repos[REPO].commit
    repo = fetching.cache_root() / f"models--{REPO.replace('/', '--')}"
    if where in ("file in snapshot", "ref"):
        fetching.fetch(REPO, progress=False)
    if where == "incomplete":
        target, link = tmp_path / "precious.txt", repo / "partial" / commit / (WHOLE + ".incomplete")
        target.write_text("a user's file " * 1000)
    elif where == "partial":
        target, link = tmp_path / "elsewhere", repo / "partial" / commit
        target.mkdir()
    elif where == "snapshot":
        target, link = tmp_path / "another", repo / "snapshots" / commit
        shutil.copytree(mixed, target)
    elif where == "file in snapshot":
        target, link = tmp_path / "another.safetensors", repo / "snapshots" / commit / WHOLE
        shutil.copy(mixed / WHOLE, target)
        link.unlink()
    else:
        target, link = tmp_path / "commit.txt", repo / "refs" / "main"
        target.write_text(commit)
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link, target


@pytest.mark.parametrize("where", ["incomplete", "partial", "snapshot", "file in snapshot", "ref"])
def test_a_symbolic_link_planted_in_the_cache_is_refused_and_never_followed(server, mixed, tmp_path, where):
    link, target = _plant(where, server, mixed, tmp_path)
    before = target.read_bytes() if target.is_file() else sorted(p.name for p in target.iterdir())
    with pytest.raises(fetching.CacheLinkError, match=re.escape(str(link))):
        fetching.fetch(REPO, progress=False)
    if where not in ("incomplete", "partial"):   # a snapshot is cached (or looks it): never loaded, even offline
        revision = server.repos[REPO].commit if where == "snapshot" else None
        with pytest.raises(fetching.CacheLinkError, match=re.escape(str(link))):
            g3n.load(REPO, revision=revision, download=False)
    after = target.read_bytes() if target.is_file() else sorted(p.name for p in target.iterdir())
    assert after == before, "nothing was written through the link"
    link.unlink()
    with warnings.catch_warnings(record=True) as caught:   # once the link is gone, the fetch works (and repairs)
        warnings.simplefilter("always")
        assert fetching.fetch(REPO, progress=False).path.name == server.repos[REPO].commit
    assert all("repairing" in str(w.message) for w in caught) and (where == "file in snapshot") == bool(caught)


def test_a_dangling_link_in_the_fetchs_own_directory_is_removed(server, mixed):
    link = _partial(server.repos[REPO].commit) / (WHOLE + ".incomplete")
    link.parent.mkdir(parents=True)
    link.symlink_to(link.parent / "nowhere")
    with pytest.warns(UserWarning, match="dangling symbolic link"):
        report = fetching.fetch(REPO, progress=False)
    assert (report.path / WHOLE).read_bytes() == (mixed / WHOLE).read_bytes()


# --- unclear crashes made clear ------------------------------------------------------------------------

def test_a_revision_too_long_for_a_file_name_is_refused_before_any_request(server):
    with pytest.raises(ValueError, match="at most 200 fit"):
        g3n.load(REPO, revision="b" * 1000)
    with pytest.raises(ValueError, match="at most 200 fit"):
        fetching.fetch(REPO, "é" * 40, progress=False)   # 40 characters, 240 once quoted
    assert server.requests == []


def test_a_complete_snapshot_on_a_read_only_cache_is_used_as_it_is(server, monkeypatch, recwarn):
    first = fetching.fetch(REPO, progress=False)
    requests = len(server.log)

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags, *a, **k: read_only(path) if flags & (
        os.O_WRONLY | os.O_RDWR | os.O_CREAT) else real_open(path, flags, *a, **k))
    monkeypatch.setattr(os, "mkdir", read_only)
    monkeypatch.setattr(cache_layout, "atomic_write", read_only)
    assert fetching.locate(REPO, progress=False) == first.path   # online: the listing names the cached commit
    assert not [w for w in recwarn if "could not record" in str(w.message)], "nothing needed writing"
    with pytest.warns(UserWarning, match=r"could not record .*Read-only file system"):
        assert fetching.fetch(REPO, first.commit, progress=False).cached   # refs/<commit> is new, and cannot be written
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetching.locate(REPO) == first.path
    assert len(server.log) == requests


@pytest.mark.parametrize("size", [None, 0])
def test_a_listing_without_sizes_fetches_small_files_and_names_a_shard_it_cannot_plan(server, mixed, size):
    small = [p.name for p in mixed.iterdir() if not p.name.endswith(".safetensors")]
    server.sizes = {name: size for name in small}
    report = fetching.fetch(REPO, progress=False)
    for name in small:
        if name != "model.safetensors.index.json":   # rewritten: it lists the text tensors only
            assert (report.path / name).read_bytes() == (mixed / name).read_bytes()
    server.sizes = {p.name: size for p in mixed.iterdir()}
    server.add(REPO, mixed)
    with pytest.raises(CheckpointError, match=f"lists {RANGED} with no size") as error:
        fetching.fetch(REPO, progress=False)
    assert "valid JSON" not in str(error.value)


def test_a_full_disk_is_named_with_its_path_and_the_fetch_resumes_later(server, mixed, monkeypatch):
    budget = [150_000]
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, file):
            self._file = file

        def write(self, data):
            if len(data) > budget[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            budget[0] -= len(data)
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

    def fdopen(fd, *args, **kwargs):
        file = real_fdopen(fd, *args, **kwargs)
        return Full(file) if os.readlink(f"/proc/self/fd/{fd}").endswith(".incomplete") else file

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(fetching.DiskFullError, match=r"no space left on device writing .*\.incomplete") as error:
        fetching.fetch(REPO, progress=False)
    assert error.value.errno == errno.ENOSPC and isinstance(error.value, fetching.FetchError)
    assert str(_partial(server.repos[REPO].commit)) in str(error.value)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    report = fetching.fetch(REPO, progress=False)
    assert report.resumed_from > 0
    assert _same_tensors(report.path / RANGED, mixed / RANGED)


def test_a_busy_or_failing_hub_is_asked_again_for_the_file_list(server, monkeypatch):
    waits = []
    monkeypatch.setattr(hub_http.time, "sleep", waits.append)
    server.info_errors = [429, 500]
    assert fetching.fetch(REPO, progress=False).commit == server.repos[REPO].commit
    assert waits == [1.0, 1.0], "Retry-After is honoured on the model-info request too"
    server.info_errors = [503] * hub_http.ATTEMPTS
    with pytest.raises(fetching.FetchError, match="did not list the files"):
        fetching.fetch(REPO, progress=False)


# --- lost work ---------------------------------------------------------------------------------------

def test_an_interrupted_fetch_is_reused_when_the_hub_moves_to_a_commit_with_the_same_files(server, mixed, monkeypatch):
    monkeypatch.setattr(hub_http.time, "sleep", lambda s: None)
    late = "model-00003-of-00005.safetensors"   # planned last
    server.cuts[late] = [20_000] + [0] * hub_http.ATTEMPTS
    with pytest.raises(fetching.FetchError):
        fetching.fetch(REPO, progress=False)
    old = _partial(server.repos[REPO].commit)
    assert (old / WHOLE).exists() and (old / RANGED).exists() and (old / (late + ".incomplete")).exists()
    served = len(server.log)
    server.add(REPO, mixed)   # the hub moves on: same files, new commit
    report = fetching.fetch(REPO, progress=False)
    assert sorted(report.files_reused) == [RANGED, WHOLE]
    assert report.resumed_from >= 20_000, "the shard in progress continues where it stopped"
    again = [(name, start, end) for _, name, start, end in server.log[served:] if name.endswith(".safetensors")]
    assert {name for name, _, _ in again} == {late}, "only the unfinished shard is asked for"
    assert not old.exists(), "the interrupted fetch's directory is not left behind"
    assert torch.equal(logits(g3n.load(REPO)), logits(g3n.load(mixed)))


def test_a_damaged_snapshot_is_named_and_the_next_fetch_repairs_only_what_is_damaged(server, mixed):
    first = fetching.fetch(REPO, progress=False)
    assert fetching.verify(first.path) == []
    with open(first.path / WHOLE, "r+b") as f:   # one bit: only a full re-check sees it
        f.seek(300_000)
        byte = f.read(1)[0]
        f.seek(300_000)
        f.write(bytes([byte ^ 0x01]))
    assert fetching.verify(first.path) == [f"{first.path / WHOLE} does not hash to the sha256 recorded when it was fetched"]
    with open(first.path / RANGED, "r+b") as f:   # a resize: every use sees it (one stat per file)
        f.truncate(1000)
    with pytest.warns(UserWarning, match=f"{RANGED} is 1000 bytes.*damaged and not used"):
        assert fetching.cached_checkpoint(REPO) is None
    served = len(server.log)
    with pytest.warns(UserWarning) as caught:
        report = fetching.fetch(REPO, progress=False)
    assert "repairing" in str(caught[0].message)
    assert {str(w.message).split(":")[0].split(" ")[0] for w in caught[1:]} == {
        str(report.path.parent.parent / "partial" / report.commit / name) for name in (WHOLE, RANGED)}
    refetched = {name for _, name, start, end in server.log[served:] if end - start > 64 * 1024}   # not headers
    assert refetched == {WHOLE, RANGED}
    assert fetching.verify(report.path) == [] and report.path == first.path
    assert _same_tensors(report.path / WHOLE, mixed / WHOLE) and _same_tensors(report.path / RANGED, mixed / RANGED)
