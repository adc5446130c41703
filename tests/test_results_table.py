"""README's results table against the run folders it names.

Every row of README's "## Results" table that names run folders (`results/...`, with `{a,b}` for
seeds) must show what those folders hold: top-1 after the last epoch and at the best test epoch
(results.json, written by train.py) as one run's number or the mean ± half the range over the
folders, and the wall time (wall.json, written by tests/repro.py) where the row gives one. A row
whose runs are not finished says so in words ("running", "not started") and the test checks that
its folders indeed have no results.json.
"""
import itertools
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PENDING = {"running", "not started", "not run"}


def results_rows():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    lines = [l for l in section.splitlines() if l.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:  # after the header and its --- line
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells)))
    return header, rows


def expand(pattern):
    """results/x/ce_s{0,1} -> [results/x/ce_s0, results/x/ce_s1]."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def folders(row):
    return [ROOT / f for p in re.findall(r"`(results/[^`]+)`", row["run folders"]) for f in expand(p)]


def shown(values):
    """One run: '65.03'; several: 'mean ± half the range', as README writes them."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    mean = sum(values) / len(values)
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}"


def named_rows():
    return [r for r in results_rows()[1] if folders(r)]


def test_table_has_the_columns_and_rows_with_runs():
    header, rows = results_rows()
    assert header[:5] == ["setting", "paper", "ours: last", "ours: best test", "run folders"]
    # the finished experiments must stay in the table
    named = {f.relative_to(ROOT).as_posix() for r in rows for f in folders(r)}
    assert {"results/gpu_cifar10/ce_s0", "results/gpu_cifar10/gbg_s0", "results/cpu_resnet32/ce_s0",
            "results/cpu_miniature/ce_s0", "results/cpu_miniature/gbg_s1"} <= named


@pytest.mark.parametrize("row", named_rows(), ids=lambda r: r["run folders"].strip("`"))
def test_row_matches_its_run_folders(row):
    runs = folders(row)
    last, best = (row[c].replace("**", "") for c in ("ours: last", "ours: best test"))
    if last in PENDING:  # a run not started yet may have no folder
        assert best in PENDING
        assert not any((run / "results.json").exists() for run in runs), \
            f"{row['run folders']} has finished: put its numbers in README's results table"
        return
    for run in runs:
        assert run.is_dir(), f"{run} named in README's results table does not exist"
    results = [json.loads((run / "results.json").read_text()) for run in runs]
    assert all(r["epochs"] == r["last"]["epoch"] + 1 for r in results), "a run that did not end"
    assert last == shown([r["last"]["top1"] for r in results])
    assert best == shown([r["best_test"]["top1"] for r in results])
    wall = re.search(r"; ([\d.]+) (min|h)\s*$", row["machine, wall time"])
    if wall:  # the mean of the runs' summed wall time over tests/repro.py's calls
        secs = [json.loads((run / "wall.json").read_text())["wall_s"] for run in runs]
        mean = sum(secs) / len(secs) / (60 if wall.group(2) == "min" else 3600)
        assert wall.group(1) == (f"{mean:.1f}" if mean < 100 else f"{mean:.0f}")


def test_expand_and_shown():
    assert expand("results/a/ce_s{0,1}") == ["results/a/ce_s0", "results/a/ce_s1"]
    assert expand("results/a/ce_s0") == ["results/a/ce_s0"]
    assert shown([65.03]) == "65.03"
    assert shown([61.22, 61.55]) == "61.38 ± 0.16"  # 61.385 rounds half to even on the float
