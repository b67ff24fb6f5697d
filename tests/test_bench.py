"""The GPU check's target evaluation (the GPU run itself needs a GPU; its arithmetic does not)."""

from __future__ import annotations

import json

from g3n_probe.cli import main
from g3n_probe.cli.gpu_check import check_markdown, check_targets

GIB = 1024**3


def _results(injected_ratio: float, saved_ratio: float, host_ratio: float, peak_gib: float,
             host_rss_gib: float = 4.0, patching_speedup: float = 12.0, decompose_ratio: float = 2.0) -> dict:
    def shape(seconds, trace_all=None, peak=None):
        entry = {"forward_seconds": seconds, "forward_peak_device_bytes": None}
        if trace_all is not None:
            entry.update(trace_seconds=seconds, trace_all_seconds=trace_all, trace_peak_device_bytes=peak)
        return entry

    shapes = ("1x128", "8x512")
    return {"device": "test", "variants": {
        "stock_text": {"resident_device_bytes": 9 * GIB, "shapes": {s: shape(1.0) for s in shapes}},
        "g3n_table_device": {"resident_device_bytes": 8 * GIB,
                             "shapes": {s: shape(injected_ratio, saved_ratio) for s in shapes}},
        "g3n_table_host": {"resident_device_bytes": 4.5 * GIB,
                           "shapes": {**{s: shape(injected_ratio * host_ratio, 2.0) for s in shapes},
                                      "1x2048": shape(1.0, 1.0, peak_gib * GIB)}},
    }, "load": {"load_to_first_trace_seconds": 30.0, "text_bytes_read_seconds": 10.0,
                "host_rss_added_bytes": host_rss_gib * GIB, "host_table_bytes": 3.75 * GIB},
        "patching": {"speedup": patching_speedup, "chunk": 64, "tokens": 128},
        "decompose": {"time_ratio": decompose_ratio, "tokens": 512}}


def test_every_target_is_evaluated_and_passes_when_met():
    rows = check_targets(_results(1.01, 1.08, 1.04, 5.5, host_rss_gib=4.6, patching_speedup=21.0, decompose_ratio=2.9))
    targets = {row["target"] for row in rows}
    assert targets == {"G1", "G2", "G3", "G4", "G5", "G6", "G7"}
    assert all(row["ok"] in (True, None) for row in rows)
    assert sum(row["target"] == "G3" for row in rows) == 4 and sum(row["target"] == "G4" for row in rows) == 2


def test_missed_targets_are_flagged():
    rows = check_targets(_results(1.03, 1.12, 1.06, 6.5, host_rss_gib=4.9, patching_speedup=19.0, decompose_ratio=3.1))
    missed = {row["target"] for row in rows if row["ok"] is False}
    assert missed == {"G2", "G3", "G4", "G5", "G6", "G7"}
    assert "≥ 20 ×" in check_markdown(rows, "test")


def test_the_check_runs_end_to_end_on_cpu(tmp_path, capsys):
    code = main(["bench", "--preset", "tiny", "--check", "--shapes", "1x128", "8x512", "--repeats", "1",
                 "--leak-traces", "0", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check_cpu_tiny.json").read_text())
    rows = report["targets"]
    assert {row["target"] for row in rows} >= {"G3", "G4", "G5", "G6", "G7", "G8"}
    assert code == (1 if any(row["ok"] is False for row in rows) else 0)  # CPU timings decide, loudly either way
    assert (tmp_path / "gpu_check_cpu_tiny.md").read_text().startswith("GPU check on CPU")


def test_the_docs_list_every_target():
    from pathlib import Path

    from g3n_probe.cli.gpu_check import TARGETS, targets_markdown

    page = (Path(__file__).resolve().parent.parent / "docs" / "guides" / "performance.md").read_text()
    block = page.split("<!-- gpu-targets:start -->\n", 1)[1].split("\n<!-- gpu-targets:end -->", 1)[0]
    assert block == targets_markdown()
    assert {t.name for t in TARGETS} == {f"G{i}" for i in range(1, 9)}
