"""From a hub id to the first trace: fetching only the bytes the text path reads (`g3n_probe.hub`).

A local server (`hubserver.FakeHub`) stands in for the hub; no test touches the network. Its
checkpoint has towers in shards of their own *and* tower tensors inside text shards, plus the k/v
tensors of KV-shared layers, which the loader skips too.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hubserver import FakeHub

import g3n_probe as g3n
from g3n_probe import hub, hub_http, synthetic
from g3n_probe.cli import main as cli
from g3n_probe.checkpoint import CheckpointError, is_text_key, keys_read, read_config

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
        return model._module(IDS).logits


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
    report = hub.fetch(REPO, progress=False)
    assert report.cached and report.bytes_fetched == 0
    assert len(server.log) == before, "no file is read again (only the model-info request)"


def test_a_cut_connection_resumes_where_it_stopped_in_the_same_call(server, mixed):
    whole = hub.fetch(REPO, cache_dir=Path(server.repos[REPO].directory).parent / "reference", progress=False)
    shard = whole.files_whole[0]
    server.log.clear()
    server.cuts[shard] = [100_000]
    report = hub.fetch(REPO, progress=False)
    spans = server.served(REPO, shard)
    assert spans[0][0] == 0 and spans[1][0] == 100_000, spans
    assert report.bytes_fetched == whole.bytes_fetched, "every byte arrived once"
    assert (report.path / shard).read_bytes() == (mixed / shard).read_bytes()


def test_an_interrupted_fetch_is_never_loaded_and_the_next_call_resumes(server, mixed, monkeypatch):
    monkeypatch.setattr(hub_http.time, "sleep", lambda s: None)
    ranged = "model-00001-of-00005.safetensors"
    server.cuts[ranged] = [50_000] * 3 + [0] * hub_http.ATTEMPTS   # progress, then a dead connection
    with pytest.raises(hub.FetchError, match="run again to resume"):
        hub.fetch(REPO, progress=False)
    assert hub.cached_checkpoint(REPO) is None
    with pytest.raises(FileNotFoundError, match="download=False"):
        g3n.load(REPO, download=False)
    served_before = len(server.served(REPO, ranged))
    report = hub.fetch(REPO, progress=False)
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
    hub.fetch(REPO, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = len(server.log)
    for options in ({}, {"local_files_only": True}, {"download": False, "revision": "main"}):
        assert g3n.load(REPO, **options).load_report.source == hub.cached_checkpoint(REPO)
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
    with pytest.raises(hub.HubAccessError) as error:
        g3n.load(REPO)
    message = str(error.value)
    assert "gated" in message and "401" in message and "license" in message and "HF_TOKEN" in message
    with pytest.raises(hub.HubAccessError, match="403"):
        g3n.load(REPO, token="hf_someone_else")
    assert server.log == [], "not a byte served"
    assert not (hub.cache_root() / f"models--{REPO.replace('/', '--')}" / "partial").exists() or \
        not any((hub.cache_root() / f"models--{REPO.replace('/', '--')}" / "partial").iterdir())
    assert g3n.load(REPO, token="hf_secret").tokenizer is not None
    assert not server.cdn_saw_authorization, "the token never goes to the CDN the hub redirects to"
    shutil.rmtree(hub.cache_root())
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
    assert hub.fetch(REPO, commit, progress=False).commit == commit
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
    with pytest.raises(hub.FetchError, match="not 206"):
        hub.fetch(REPO, progress=False)


def test_single_file_checkpoint_is_fetched_as_text_ranges(server, tmp_path, mixed):
    from safetensors.torch import save_file

    single = tmp_path / "single"
    single.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(mixed / name, single)
    save_file(_tensors(mixed), single / "model.safetensors", metadata={"format": "pt"})
    server.add("g3n-test/single", single)
    report = hub.fetch("g3n-test/single", progress=False)
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

    hub.fetch(REPO, progress=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")   # nothing listens there
    monkeypatch.setattr(hub_http.time, "sleep", lambda s: None)
    with pytest.warns(UserWarning, match="using the cached text-only checkpoint"):
        assert g3n.load(REPO).load_report.source == hub.cached_checkpoint(REPO)


def test_a_stalled_connection_times_out_and_resumes(server, monkeypatch, mixed):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)
    monkeypatch.setattr(hub_http.time, "sleep", lambda s: None)
    shard = "model-00002-of-00005.safetensors"   # text only: fetched whole
    server.stalls[shard] = [100_000]
    report = hub.fetch(REPO, progress=False)
    assert [start for start, _ in server.served(REPO, shard)] == [0, 100_000]
    assert (report.path / shard).read_bytes() == (mixed / shard).read_bytes()


def test_busy_server_is_waited_for_as_it_asks(server, monkeypatch):
    waits = []
    monkeypatch.setattr(hub_http.time, "sleep", waits.append)
    server.busy = 2
    hub.fetch(REPO, progress=False)
    assert waits == [1.0, 1.0], "Retry-After is honoured"


def test_a_new_commit_reuses_unchanged_shards(server, mixed):
    first = hub.fetch(REPO, progress=False)
    served = len(server.log)
    server.add(REPO, mixed)   # a new commit, same files (say, a model-card edit)
    second = hub.fetch(REPO, progress=False)
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
        hub.fetch("g3n-test/bad", progress=False)
    assert not list(hub.cache_root().glob("models--g3n-test--bad/partial/*/*.incomplete"))


def test_info_and_points_fetch_only_the_config(server, capsys):
    assert cli(["points", REPO]) == 0
    assert cli(["info", REPO]) == 0
    assert {name for _, name, _, _ in server.log} <= {"config.json", "model.safetensors.index.json"}
    assert "weights not fetched" in capsys.readouterr().out


def test_a_tower_of_a_text_only_fetch_says_why_it_is_missing(server):
    model = g3n.load(REPO)
    with pytest.raises(g3n.TowerNotLoadedError, match="text-only fetch of g3n-test/tiny-gemma-3n"):
        model.load_tower("audio")
