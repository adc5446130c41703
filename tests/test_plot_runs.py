"""tests/plot_runs.py on two tiny runs made here (synthetic-lt: CE+GBG+MOO with GAC, and plain CE),
both with the Fig. 2 diagnostic every epoch: every picture is written as a real PNG, and what is
drawn is what log.txt holds (read back from the returned figures' lines and bars)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="tests/plot_runs.py draws with matplotlib: pip install matplotlib")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import plot_runs  # noqa: E402
from test_train import TINY  # noqa: E402

PICTURES = ["accuracy.png", "alpha.png", "group_loss.png", "update_ratio.png", "fig2_diagnostic.png"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """GBG: 2 epochs, epoch 0 not evaluated (--eval-every 2), grouped at epoch 0 (the warm-up of 5
    epochs is longer than the run); CE: 2 epochs. Both side by side (2 processes)."""
    top = tmp_path_factory.mktemp("plot_runs")
    flags = {"gbg": ["--epochs", "2", "--eval-every", "2"],
             "ce": ["--epochs", "2", "--grouping", "none", "--moo", "none", "--sampler", "random"]}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, *f, "--diag-every", "1",
                                     "--diag-batches", "1", "--output-dir", str(top / name)], cwd=ROOT, env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, f in flags.items()}
    try:
        for name, p in procs.items():
            err = p.communicate(timeout=900)[1]  # room for a busy machine; alone, ~10 s
            assert p.returncode == 0, f"{name}: {err[-3000:]}"
    finally:  # no run left behind when one fails
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return top / "ce", top / "gbg"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plot_runs.plt.close("all")


def log(folder):
    return [json.loads(line) for line in open(folder / "log.txt")]


def plot(*argv):
    return subprocess.run([sys.executable, str(ROOT / "tests" / "plot_runs.py"), *map(str, argv)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=120)


def test_every_picture_is_written(runs, tmp_path):
    ce, gbg = runs
    r = plot(ce, gbg, "--labels", "CE", "CE+GBG+MOO", "--out", tmp_path / "plots")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in PICTURES:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert 5_000 < len(data) < 150_000, (name, len(data))
    from PIL import Image
    for name in PICTURES:
        with Image.open(tmp_path / "plots" / name) as im:
            im.verify()  # the whole file decodes
            assert min(im.size) >= 300, (name, im.size)


def test_drawn_series_are_the_logged_values(runs):
    ce, gbg = runs
    ce_log, gbg_log = log(ce), log(gbg)
    drawn = plot_runs.with_colors([plot_runs.load_run(ce, "CE"), plot_runs.load_run(gbg, "CE+GBG+MOO")])

    # (a): one line per run; the GBG run's epoch 0 was not evaluated and has no point
    top1 = plot_runs.draw_accuracy(drawn).axes[0]
    for line, rows in zip(top1.lines, (ce_log, gbg_log)):
        evaluated = [r for r in rows if "test_top1" in r]
        assert list(line.get_xdata()) == [r["epoch"] for r in evaluated]
        assert list(line.get_ydata()) == [r["test_top1"] for r in evaluated]
    assert list(top1.lines[0].get_xdata()) == [0, 1] and list(top1.lines[1].get_xdata()) == [1]

    # (b), (d): only the GBG run logs alpha and update_ratio; one alpha line per group
    alpha = plot_runs.draw_per_group(drawn, "alpha_mean", "alpha", "alpha").axes
    assert len(alpha) == 1
    groups = json.load(open(gbg / "groups.json"))["groups"]
    assert len(alpha[0].lines) == len(groups)
    for g, line in enumerate(alpha[0].lines):
        assert list(line.get_ydata()) == [r["alpha_mean"][g] for r in gbg_log]
    ratio = plot_runs.draw_update_ratio(drawn).axes[0]
    drawn_ratio = [list(line.get_ydata()) for line in ratio.lines if line.get_label() == "CE+GBG+MOO"]
    assert drawn_ratio == [[r["update_ratio"] for r in gbg_log]] and len(ratio.get_legend().texts) == 1

    # (e): at the last epoch both runs diagnosed (1 of 0, 1), bar height = diag_cos of the class
    # named under it, CE's bars left of GBG's, classes ordered by training count
    assert plot_runs.diag_epoch(drawn[0], drawn[1], "last") == 1
    for k, mean in enumerate(plot_runs.diag_values(drawn[1], "diag_ratio", "mean")):  # --diag-epoch mean
        logged = [r["diag_ratio"][k] for r in gbg_log if r["diag_ratio"][k] is not None]
        assert mean is None if not logged else mean == pytest.approx(sum(logged) / len(logged))
    ax = plot_runs.draw_diagnostic(drawn[0], drawn[1], 1).axes[0]
    ticks = [t.get_text().split("\n") for t in ax.get_xticklabels()]
    classes, counts = [int(name.split()[1]) for name, _ in ticks], [int(n) for _, n in ticks]
    assert sorted(classes) == list(range(10)) and counts == sorted(counts, reverse=True)
    bars = sorted(ax.patches, key=lambda b: b.get_x())
    for n, k in enumerate(classes):
        for bar, rows in zip(bars[2 * n:2 * n + 2], (ce_log, gbg_log)):
            want = rows[1]["diag_cos"][k]
            assert math.isnan(bar.get_height()) if want is None else bar.get_height() == pytest.approx(want)


def test_epochs_logged_as_nan_or_twice(runs, tmp_path):
    """An epoch whose test keys are NaN draws no point; an epoch logged twice (a resume after the
    log line, before the checkpoint) draws its last line only."""
    ce = runs[0]
    rows = log(ce)
    rows[0]["test_top1"] = float("nan")
    rows.append(dict(rows[1], test_top1=12.5))
    (tmp_path / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = plot_runs.with_colors([plot_runs.load_run(tmp_path)])
    line = plot_runs.draw_accuracy(run).axes[0].lines[0]
    assert list(line.get_xdata()) == [1] and list(line.get_ydata()) == [12.5]


def test_diagnostic_classes_follow_the_training_counts(runs, tmp_path):
    """Classes head to tail by groups.json's counts, not by class id (ImageNet-LT's ids are not
    ordered by count); --diag-classes N keeps the N largest and the N smallest."""
    gbg = runs[1]
    info = json.load(open(gbg / "groups.json"))
    rank = [3, 7, 0, 9, 1, 5, 8, 2, 6, 4]  # class k gets the rank[k]-th largest count
    info["counts"] = [[1000 - 10 * rank[k] for k in members] for members in info["groups"]]
    (tmp_path / "groups.json").write_text(json.dumps(info))
    (tmp_path / "log.txt").write_bytes((gbg / "log.txt").read_bytes())
    run = plot_runs.with_colors([plot_runs.load_run(tmp_path, "a"), plot_runs.load_run(tmp_path, "b")])
    head_first = sorted(range(10), key=lambda k: rank[k])
    for per_end, want in ((None, head_first), (2, head_first[:2] + head_first[-2:])):
        ax = plot_runs.draw_diagnostic(run[0], run[1], 1, per_end).axes[0]
        assert [int(t.get_text().split()[1]) for t in ax.get_xticklabels()] == want


def test_one_line_errors(tmp_path):
    r = plot(tmp_path, "--out", tmp_path / "plots")  # no log.txt
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no log.txt" in r.stderr
    without = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot_runs.py', 'x', '--out', 'y']; "
               f"runpy.run_path({str(ROOT / 'tests' / 'plot_runs.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "pip install matplotlib" in r.stderr


def test_shot_thresholds_are_data_lt_s():
    import data_lt
    assert (plot_runs.MANY, plot_runs.FEW) == (data_lt.MANY, data_lt.FEW)


# --- planted logs: what a run folder may hold while a run goes or after a resume --------------------
def planted(folder, rows, tail=""):
    """A run folder whose log.txt holds `rows`, then `tail` (a line still being written)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return folder


def test_each_accuracy_panel_draws_its_own_key(tmp_path):
    """(a)'s four panels, each titled with what it draws and drawing that key of the log: values
    distinct per key, so that two panels swapped (Medium and Few) or fed the same key are seen."""
    rows = [{"epoch": e, "test_top1": 10.0 + e, "test_many": 20.0 + e, "test_medium": 30.0 + e, "test_few": 40.0 + e}
            for e in range(3)]
    run = plot_runs.with_colors([plot_runs.load_run(planted(tmp_path / "r", rows))])
    axes = plot_runs.draw_accuracy(run).axes
    for ax, key, word in zip(axes, ("test_top1", "test_many", "test_medium", "test_few"),
                             ("top-1", "Many", "Medium", "Few")):
        assert word in ax.get_title(), (key, ax.get_title())
        assert [list(l.get_ydata()) for l in ax.lines] == [[r[key] for r in rows]], (key, ax.get_title())
    shots = {w: a.get_title() for a in axes for w in ("Many", "Medium", "Few") if w in a.get_title()}
    assert shots == {"Many": f"Many (> {plot_runs.MANY} images)", "Medium": f"Medium ({plot_runs.FEW}-{plot_runs.MANY} "
                     f"images)", "Few": f"Few (< {plot_runs.FEW} images)"}


def test_diag_mean_is_over_the_epochs_both_runs_diagnosed(tmp_path):
    """--diag-epoch mean: the base run diagnosed epochs 0 and 1, the other only 1: both are drawn
    at epoch 1 alone, not the base at the mean of 0 and 1."""
    base = planted(tmp_path / "ce", [{"epoch": 0, "diag_cos": [0.9, 0.1], "diag_ratio": [1.0, 2.0]},
                                     {"epoch": 1, "diag_cos": [0.5, 0.3], "diag_ratio": [3.0, 4.0]}])
    other = planted(tmp_path / "gbg", [{"epoch": 0}, {"epoch": 1, "diag_cos": [0.2, 0.4], "diag_ratio": [5.0, 6.0]}])
    runs = plot_runs.with_colors([plot_runs.load_run(base, "CE"), plot_runs.load_run(other, "GBG")])
    assert plot_runs.diag_epoch(runs[0], runs[1], "mean") == "mean"
    ax = plot_runs.draw_diagnostic(runs[0], runs[1], "mean").axes[0]
    bars = sorted(ax.patches, key=lambda b: b.get_x())
    assert [b.get_height() for b in bars] == pytest.approx([0.5, 0.2, 0.3, 0.4])  # class 0: CE, GBG; class 1


def test_a_log_being_written_or_with_odd_lines_still_plots(tmp_path):
    """A last line without its newline (the run is writing it), a line without an epoch, a diagnosed
    epoch without diag_ratio: drawn from the complete epoch lines; runs of different class counts:
    the diagnostic picture is skipped with one line, the others are drawn."""
    a = planted(tmp_path / "a", [{"epoch": 0, "test_top1": 10.0, "diag_cos": [0.1, 0.2]}, {"note": "no epoch"},
                                 {"epoch": 1, "test_top1": 20.0, "diag_cos": [0.3, 0.4]}], tail='{"epoch": 2, "test_')
    b = planted(tmp_path / "b", [{"epoch": 1, "test_top1": 30.0, "diag_cos": [0.5, 0.6, 0.7]}])
    run = plot_runs.with_colors([plot_runs.load_run(a), plot_runs.load_run(a, "again")])
    line = plot_runs.draw_accuracy(run).axes[0].lines[0]
    assert list(line.get_xdata()) == [0, 1] and list(line.get_ydata()) == [10.0, 20.0]
    ax = plot_runs.draw_diagnostic(run[0], run[1], 1).axes[0]  # diag_cos without diag_ratio: bars, no dots
    assert sorted(b.get_height() for b in ax.patches) == pytest.approx([0.3, 0.3, 0.4, 0.4])
    r = plot(a, b, "--out", tmp_path / "plots")
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = [l for l in r.stdout.splitlines() if "fig2_diagnostic.png: skipped" in l]
    assert len(skipped) == 1 and "a has 2 classes and b 3" in skipped[0]
    assert (tmp_path / "plots" / "accuracy.png").exists() and not (tmp_path / "plots" / "fig2_diagnostic.png").exists()


# --- seeds, smoothing, panels, which seed ----------------------------------------------------------
def test_seeds_of_one_label_are_a_mean_with_a_min_max_band(tmp_path):
    """Two runs under one label (two seeds): one line, their mean over the epochs both hold, and a
    band from their minimum to their maximum, both named in the legend; --smooth N is the running
    mean of each run's last N values before the mean, said in the title."""
    a = planted(tmp_path / "gbg_s0", [{"epoch": e, "test_top1": v} for e, v in enumerate([10.0, 20.0, 30.0])])
    b = planted(tmp_path / "gbg_s1", [{"epoch": e, "test_top1": v} for e, v in enumerate([14.0, 10.0, 50.0, 60.0])])
    c = planted(tmp_path / "ce_s0", [{"epoch": e, "test_top1": 5.0} for e in range(3)])
    runs = plot_runs.with_colors([plot_runs.load_run(c, "CE"), plot_runs.load_run(a, "GBG"),
                                  plot_runs.load_run(b, "GBG")])
    ax = plot_runs.draw_accuracy(runs).axes[0]
    assert [l.get_label() for l in ax.lines] == ["CE", "GBG: mean of 2 seeds, band min-max"]
    assert list(ax.lines[1].get_xdata()) == [0, 1, 2] and list(ax.lines[1].get_ydata()) == [12.0, 15.0, 40.0]
    (band,) = ax.collections
    ys = sorted({round(float(y), 6) for y in band.get_paths()[0].vertices[:, 1]})
    assert ys == [10.0, 14.0, 20.0, 30.0, 50.0]  # min and max at each epoch
    assert ax.get_legend().texts[1].get_text() == "GBG: mean of 2 seeds, band min-max"
    fig = plot_runs.draw_accuracy(runs, smooth=2)
    assert list(fig.axes[0].lines[1].get_ydata()) == [12.0, 13.5, 27.5]  # (10+14)/2, (15+12)/2, (25+30)/2
    assert "running mean over 2 epochs" in fig._suptitle.get_text()
    r = plot(a, b, "--labels", "GBG", "GBG", "--smooth", "0", "--out", tmp_path / "plots")
    assert r.returncode == 1 and "--smooth 0" in r.stderr and r.stderr.strip().count("\n") == 0


def test_a_shot_group_no_run_holds_gets_no_panel(tmp_path):
    """CIFAR-10-LT IF 100 has no Few class (test_few null): three panels, titled by their shot group."""
    rows = [{"epoch": e, "test_top1": 50.0 + e, "test_many": 60.0, "test_medium": 30.0 + e, "test_few": None}
            for e in range(3)]
    run = plot_runs.with_colors([plot_runs.load_run(planted(tmp_path / "ce_s0", rows), "CE")])
    titles = [ax.get_title() for ax in plot_runs.draw_accuracy(run).axes]
    assert [t.split()[0] for t in titles] == ["test", "Many", "Medium"]
    medium = plot_runs.draw_accuracy(run).axes[2]
    assert list(medium.lines[0].get_ydata()) == [30.0, 31.0, 32.0]
    rows = [dict(r, test_few=10.0) for r in rows]
    run = plot_runs.with_colors([plot_runs.load_run(planted(tmp_path / "few_s0", rows), "CE")])
    assert [ax.get_title().split()[0] for ax in plot_runs.draw_accuracy(run).axes] == ["test", "Many", "Medium", "Few"]


def test_diagnostic_title_says_which_seed(tmp_path):
    base = planted(tmp_path / "ce_s1", [{"epoch": 0, "diag_cos": [0.9, 0.1]}])
    other = planted(tmp_path / "gbg", [{"epoch": 0, "diag_cos": [0.2, 0.4]}])
    (other / "results.json").write_text(json.dumps({"args": {"seed": 3}}))
    runs = plot_runs.with_colors([plot_runs.load_run(base, "CE"), plot_runs.load_run(other, "GBG")])
    title = plot_runs.draw_diagnostic(runs[0], runs[1], 0)._suptitle.get_text()
    assert "CE (seed 1) beside GBG (seed 3)" in title
