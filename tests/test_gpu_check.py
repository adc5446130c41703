"""tests/gpu_check.py's pieces on the CPU (the script itself refuses there), and how tests/repro.py
sizes its rows from the check's images/s."""
import json
import subprocess
import sys
import types
import warnings

import pytest
import torch

import gpu_check as C
import repro

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


# --- tests/repro.py: the rows sized from the check ------------------------------------------------

REPORT = {"steps": {"ce": {"images_per_s": 12000.0}, "gbg": {"images_per_s": 4000.0},
                    "bcl": {"images_per_s": 3000.0}},
          "bench_f": {"fp32": {"ce": 6000.0, "exact": 2500.0}, "bf16": {"ce": 12000.0, "exact": 5000.0}}}


def repro_args(*argv):
    return repro.check_args(repro.get_args_parser().parse_args(["--device", "cuda", *argv]))


def test_run_seconds_by_hand():
    """200 epochs of 12,406 training images at the row's rate, plus 10,000 test images at 3x the CE
    rate; every class its own objective at 4/10 of the exact step's rate; fp32 at bench (f)'s ratio."""
    args = repro_args("--runs", "ce,gbg,moo,bcl,bcl_gbg")
    test = 10000 / 36000
    assert repro.run_seconds("ce", args, REPORT) == pytest.approx(200 * (12406 / 12000 + test))
    assert repro.run_seconds("gbg", args, REPORT) == pytest.approx(200 * (12406 / 4000 + test))
    assert repro.run_seconds("moo", args, REPORT) == pytest.approx(200 * (12406 / 1600 + test))
    assert repro.run_seconds("bcl", args, REPORT) == pytest.approx(200 * (12406 / 3000 + test))
    assert repro.run_seconds("bcl_gbg", args, REPORT) is None  # not measured
    fp32 = repro_args("--runs", "ce", "--no-amp", "--epochs", "10")
    assert repro.run_seconds("gbg", fp32, REPORT) == pytest.approx(10 * (12406 / 2000 + test))


def test_plan_keeps_runs_in_priority_order_while_their_sum_fits():
    kept, dropped = repro.plan_runs(["a", "b", "c", "d"], [300.0, 700.0, None, 50.0], 1000.0)
    assert kept == ["a", "b", "c"] and dropped == ["d"]  # 300 + 700 = 1000 fits; d would make 1050
    assert repro.plan_runs(["a", "b"], [1200.0, 100.0], 1000.0) == (["b"], ["a"])


def test_repro_runs_the_check_first_and_does_not_start_what_cannot_end(tmp_path, monkeypatch):
    args = repro_args("--runs", "ce,gbg,bcl", "--budget", "1000", "--out", str(tmp_path))
    calls = []

    def fake_check(cmd, cwd):
        calls.append(cmd)
        folder = tmp_path / "gpu_check"
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps(REPORT))
        return types.SimpleNamespace(returncode=0)
    monkeypatch.setattr(subprocess, "run", fake_check)
    repro.gpu_check_first(args, repro.time.time())
    assert calls and calls[0][1].endswith("tests/gpu_check.py") and calls[0][2] == str(tmp_path / "gpu_check")
    # ce 262 s + gbg 676 s fit in 1000 - 10 s; bcl (883 s) does not
    assert args.planned_out == ["bcl_s0"]
    stop = json.loads((tmp_path / "bcl_s0" / "stop.json").read_text())
    assert stop["status"] == "not started" and "planned out: needs 883 s" in stop["reason"]
    assert repro.run_status(tmp_path / "bcl_s0") == "not started"
