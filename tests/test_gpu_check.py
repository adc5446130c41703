"""tests/gpu_check.py's pieces on the CPU (the script itself refuses there)."""
import json
import sys
import warnings

import pytest
import torch

import gpu_check as C

SMALL = dict(arch="resnet8", batch_size=16)


@pytest.fixture(scope="module")
def data():
    return C.lt_data(torch.device("cpu"), n_max=60, size=8)


def test_refuses_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="gpu_check.py: error: no CUDA device visible"):
        C.main([str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_sync_warnings_are_counted_per_step():
    """Only set_sync_debug_mode's warnings count, each time it warns; Marked gives each batch the
    ones raised from its start to the next batch's."""
    with C.Counting() as counting:
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
        loader = C.Marked([1, 2, 3], counting)
        for i in loader:
            for _ in range(i - 1):
                line = sys._getframe().f_lineno + 1
                warnings.warn("called a synchronizing CUDA operation")
        assert counting.syncs() == 4 and loader.per_step() == [0, 1, 2]
        assert counting.where(start=2) == [f"test_gpu_check.py:{line}"]  # the line that warned


@pytest.mark.parametrize("kind", ["ce", "gbg", "bcl_gbg"])
def test_steps_run_through_train_py(kind, data):
    """(a) on the CPU: train.py's steps (device views for BCL) run; no CUDA, so no sync is seen."""
    r = C.measure(kind, torch.device("cpu"), amp=False, steps=3, data=data, **SMALL)
    assert r["syncs_per_step"] == [0] and r["expected_per_step"] == (0 if kind == "ce" else 1)
    assert r["images_per_s"] > 0 and r["ok"] == (kind == "ce")


def test_grouping_pass_and_deterministic_repeat(data):
    """A grouping pass runs (no syncs on the CPU); the repeated runs are bit-identical on the CPU with
    and without --deterministic, and torch's global settings come back as they were."""
    assert C.grouping_syncs(torch.device("cpu"), data, arch="resnet8")["ok"]
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    r = C.deterministic_repeat(torch.device("cpu"), steps=2, data=data, **SMALL)
    assert r["ok"] and r["default"]["bit_identical"] and r["deterministic"]["max_abs_diff"] == 0.0
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic) == before


def test_report_says_which_part_failed(tmp_path):
    step = lambda syncs, ok: {"syncs_per_step": syncs, "syncs_first_last": [1, 2], "sync_lines": ["gbg.py:1"],
                              "expected_per_step": 1, "ok": ok, "images_per_s": 4000.0, "warm_up_s": 1.0}
    report = {"device": "GPU", "torch": "2", "python": "3", "wall_s": 10.0,
              "steps": {"gbg": step([1, 1], True), "gbg_compile": {"skipped": "--budget 170 s spent"}},
              "grouping": {"syncs": 5, "ok": True, "sync_lines": [], "seconds": 1.0},
              "deterministic": {"ok": True}}
    C.write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["ok"]
    assert "all checks passed" in (tmp_path / "report.md").read_text()
    report["steps"]["bcl_gbg"] = step([1, 3], False)
    C.write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert not json.loads((tmp_path / "report.json").read_text())["ok"] and "SOME CHECKS FAILED" in md
    assert "| bcl_gbg | [1, 3] (1) | 4000 |" in md and "| gbg_compile | --budget 170 s spent |" in md
