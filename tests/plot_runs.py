#!/usr/bin/env python
"""Pictures of train.py run folders (their log.txt and groups.json), drawn into --out as PNG:

  accuracy.png          test top-1 and Many / Medium / Few over the epochs, one line per run (a panel
                        no run has classes for, e.g. Few on CIFAR-10-LT, is left out)
  alpha.png             MGDA's weight per group (alpha_mean) over the epochs, one panel per GBG run
  group_loss.png        each group's training loss (train_group_loss), one panel per GBG run
  update_ratio.png      |d| / |g_mean| over the epochs (update_ratio), one line per run that logs it
  fig2_diagnostic.png   the paper's Fig. 2 measure (its appendix figure: CE beside CE+GBG+MOO), per
                        class at one epoch, from --diag-every's diag_cos (bars) and diag_ratio (dots)

    python tests/plot_runs.py RUN_DIR [RUN_DIR ...] --out FOLDER [--labels L1 L2 ...]
    python tests/plot_runs.py results/cpu_miniature/ce_s0 results/cpu_miniature/gbg_s0 --labels CE CE+GBG+MOO \\
        --out results/cpu_miniature/plots

Runs given the same label (the seeds of one method) are drawn as their mean with a band from their
minimum to their maximum, said in the legend. --smooth N draws each run's curves as the running
mean of its last N logged epochs (said in the title): per-epoch test accuracy of a two-class shot
group (CIFAR-10-LT's Medium) is noisy until the lr drops.

Pairing for fig2_diagnostic.png: the first run given is the baseline (CE) and the second the run
beside it (CE+GBG+MOO); --diag-pair I J picks two others (0-based, in the order given). Runs without
a key are left out of that picture; a picture no run has data for is skipped with one line.

matplotlib is needed here only (not by train.py, gbg.py or data_lt.py): pip install matplotlib.
"""
import argparse
import io
import json
import math
import re
import sys
from pathlib import Path

try:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from PIL import Image  # a dependency of matplotlib's
except ImportError:
    sys.exit("tests/plot_runs.py draws with matplotlib, which is not installed: pip install matplotlib")

MANY, FEW = 100, 20  # data_lt.MANY / data_lt.FEW (Many: > 100 training images, Few: < 20); torch not needed here
COLORS = plt.get_cmap("tab10").colors
DPI = 80  # ~900 x 560 px pictures; saved with a 128-colour palette, 40-120 KB


# --- reading run folders --------------------------------------------------------------------------

def load_run(folder, label=None):
    """A run folder as a dict: label, name (the folder's), log (one dict per epoch, the last line of
    an epoch kept when a resumed run logged it twice; a last line without its newline, which a run
    still going is writing, and lines without an epoch are left out), groups (groups.json or None)."""
    folder = Path(folder)
    if not (folder / "log.txt").is_file():
        sys.exit(f"{folder}: no log.txt; give run folders that train.py wrote (its --output-dir)")
    by_epoch = {}
    for n, line in enumerate(open(folder / "log.txt"), 1):
        if line.strip() and line.endswith("\n"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                sys.exit(f"{folder}/log.txt line {n} is not JSON: give a log.txt that train.py wrote")
            if isinstance(row, dict) and row.get("epoch") is not None:
                by_epoch[row["epoch"]] = row
    groups = json.load(open(folder / "groups.json")) if (folder / "groups.json").is_file() else None
    return {"label": label or folder.name, "name": folder.name, "log": [by_epoch[e] for e in sorted(by_epoch)],
            "groups": groups, "seed": run_seed(folder)}


def run_seed(folder):
    """train.py's --seed of a run: results.json's args, else the folder's _s<seed> suffix, else None."""
    try:
        return int(json.load(open(folder / "results.json"))["args"]["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        m = re.search(r"_s(\d+)$", folder.name)
        return int(m.group(1)) if m else None


def number(v):
    """A logged value as a float, None for a missing, null or NaN one (epochs not evaluated)."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def series(run, key, smooth=1):
    """(epochs, values) of one scalar key, skipping the epochs that do not hold it; with smooth N > 1,
    each value is the mean of the last N values held (fewer at the start)."""
    pairs = [(row["epoch"], number(row.get(key))) for row in run["log"]]
    pairs = [(e, v) for e, v in pairs if v is not None]
    values = [v for _, v in pairs]
    if smooth > 1:
        values = [sum(values[max(0, i + 1 - smooth):i + 1]) / len(values[max(0, i + 1 - smooth):i + 1])
                  for i in range(len(values))]
    return [e for e, _ in pairs], values


def group_series(run, key):
    """Per group g, (epochs, values) of the list-valued key (alpha_mean, train_group_loss)."""
    out = []
    for row in run["log"]:
        for g, v in enumerate(row.get(key) or []):
            if g == len(out):
                out.append(([], []))
            if number(v) is not None:
                out[g][0].append(row["epoch"])
                out[g][1].append(float(v))
    return out


def class_counts(run):
    """{class: training images} from groups.json (its groups and their counts), {} without one."""
    info = run["groups"] or {}
    return {k: n for members, counts in zip(info.get("groups", []), info.get("counts", []))
            for k, n in zip(members, counts)}


def class_name(k, names):
    return names[k] if names and k < len(names) else f"class {k}"


def group_label(g, run, names):
    """'group g: its classes' (the final groups of groups.json; the first three names when long)."""
    groups = (run["groups"] or {}).get("groups", [])
    if g >= len(groups):
        return f"group {g}"
    members = [class_name(k, names) for k in groups[g]]
    shown = ", ".join(members[:3]) + (f", ... ({len(members)} classes)" if len(members) > 3 else "")
    return f"group {g}: {shown}"


# --- the pictures -----------------------------------------------------------------------------------

def with_colors(runs):
    """Gives each run a colour and a legend entry: runs with the same label (the seeds of one
    method) share the colour and are drawn together (plot_series: their mean and a min-max band)."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    seen = set()
    for r in runs:
        r["color"] = COLORS[labels.index(r["label"]) % len(COLORS)]
        r["legend"] = "_nolegend_" if r["label"] in seen else r["label"]
        seen.add(r["label"])
    return runs


def plot_series(ax, runs, key, smooth=1):
    """Draws `key` over the epochs on ax: one line per label. A label with one run: its values; with
    several (seeds): their mean over the epochs all of them hold, and a band from their minimum to
    their maximum, both said in the legend. Smoothing (running mean) is per run, before the mean."""
    for label in dict.fromkeys(r["label"] for r in runs):
        same = [r for r in runs if r["label"] == label]
        held = [dict(zip(*series(r, key, smooth))) for r in same]
        held = [h for h in held if h]
        if not held:
            continue
        if len(held) == 1:
            x = sorted(held[0])
            ax.plot(x, [held[0][e] for e in x], color=same[0]["color"], lw=0.9, label=label)
            continue
        x = sorted(set.intersection(*(set(h) for h in held)))
        if not x:
            continue
        values = [[h[e] for h in held] for e in x]
        ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=same[0]["color"], alpha=0.2,
                        lw=0)
        ax.plot(x, [sum(v) / len(v) for v in values], color=same[0]["color"], lw=0.9,
                label=f"{label}: mean of {len(held)} seeds, band min-max")


SHOTS = [("test_top1", "test top-1"), ("test_many", "Many (> 100 images)"),
         ("test_medium", "Medium (20-100 images)"), ("test_few", "Few (< 20 images)")]


def smoothed(smooth):
    return f" (running mean over {smooth} epochs)" if smooth > 1 else ""


def draw_accuracy(runs, smooth=1):
    """(a) test top-1 and Many / Medium / Few (%) over the epochs, one line per run (per label, see
    plot_series). Panels are titled by their shot group ('Many ...', 'Medium ...', 'Few ...'); a
    shot group no run holds (CIFAR-10-LT IF 100 has no Few class: its tail has 50 images) gets no
    panel."""
    panels = [(key, title) for key, title in SHOTS if any(series(r, key)[0] for r in runs)] or SHOTS[:1]
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.5 * rows + 0.5), sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        plot_series(ax, runs, key, smooth)
        if not ax.lines:
            ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.set_xlabel("epoch")
    for ax in list(axes.flat)[len(panels):]:
        fig.delaxes(ax)
    axes[0, 0].legend(fontsize=8)
    if smooth > 1:
        fig.suptitle("test accuracy" + smoothed(smooth), fontsize=11)
    fig.tight_layout()
    return fig


def draw_per_group(runs, key, ylabel, title, names=None):
    """(b), (c): one panel per run that logs the list-valued key, one line per group. The groups are
    groups.json's final ones; dotted lines mark the epochs a run regrouped at (group g's members
    may change there)."""
    runs = [r for r in runs if group_series(r, key)]
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, max(4.5, 1.2 + 2.4 * len(runs))), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        for g, (x, y) in enumerate(group_series(run, key)):
            ax.plot(x, y, lw=0.9, label=group_label(g, run, names))
        history = (run["groups"] or {}).get("history", [])
        for h in history[1:]:
            ax.axvline(h["epoch"], color="grey", ls=":", lw=0.8)
        regrouped = " (regrouped at the dotted lines; legend: the last groups)" if len(history) > 1 else ""
        ax.set_title(f"{run['label']}, {run['name']}{regrouped}", fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    axes[-1, 0].set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def draw_update_ratio(runs, smooth=1):
    """(d) update_ratio over the epochs, one line per run that logs it (per label, see plot_series)."""
    fig, ax = plt.subplots(figsize=(11, 4.5))
    plot_series(ax, runs, "update_ratio", smooth)
    if not ax.lines:
        plt.close(fig)
        return None
    ax.axhline(1, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("|d| / |g_mean|")
    ax.set_title("update_ratio: the length of the MGDA step d against the gradient of the plain sample-mean "
                 "loss\n(the same batch; mean over every --ratio-every-th step of the epoch)" + smoothed(smooth),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def diag_values(run, key, epoch, epochs=None):
    """The per-class list `key` at `epoch`, or its mean per class over the diagnosed epochs (epoch
    'mean': those in `epochs`, all of them when None), None for a class absent from the diagnostic
    batches; [] when no such epoch logs `key`."""
    rows = [r for r in run["log"] if r.get(key) is not None and (
        r["epoch"] == epoch if epoch != "mean" else epochs is None or r["epoch"] in epochs)]
    per_class = [[v for v in map(number, vs) if v is not None] for vs in zip(*[r[key] for r in rows])]
    return [sum(vs) / len(vs) if vs else None for vs in per_class]


def diag_classes(counts, K, per_end):
    """The classes to show, head first: sorted by training count (by id where counts are unknown),
    all of them, or the per_end largest and per_end smallest (the paper shows two and two)."""
    order = sorted(range(K), key=lambda k: (-counts[k], k)) if len(counts) == K else list(range(K))
    return order if not per_end or 2 * per_end >= K else order[:per_end] + order[-per_end:]


def shot(n):
    return "Many" if n > MANY else "Few" if n < FEW else "Medium"


def draw_diagnostic(base, other, epoch, per_end=None, names=None):
    """(e) the paper's Fig. 2 measure, as its appendix figure: per class, bars of the mean over the
    diagnostic batches of cos(g_k, d), g_k the class's cross-entropy gradient in a batch and d the
    update the step takes on that batch (the batch gradient under CE, sum_i w_i g_i under MGDA),
    the base run beside the other; dots: |g_k| / |d| (train.py gradient_diagnostic,
    gbg.class_update_cosines). Each run's diagnostic batches are drawn by its own sampler; with
    epoch 'mean', both runs are averaged over the epochs both diagnosed. ValueError (one line)
    when the two runs have different numbers of classes."""
    both = diagnosed_epochs(base) & diagnosed_epochs(other)
    cos = [diag_values(r, "diag_cos", epoch, both) for r in (base, other)]
    K = len(cos[0])
    if len(cos[1]) != K:
        raise ValueError(f"{base['label']} has {K} classes and {other['label']} {len(cos[1])}: give --diag-pair "
                         f"two runs of the same data set")
    ratio = [diag_values(r, "diag_ratio", epoch, both) or [None] * K for r in (base, other)]  # none logged: no dots
    counts = class_counts(other) or class_counts(base)
    if per_end is None:  # every class of a small data set, else the paper's two head and two tail classes
        per_end = 0 if K <= 20 else 2
    shown = diag_classes(counts, K, per_end)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(shown) + 2), 5.5))
    dots = ax.twinx()
    w = 0.38
    nan = lambda v: math.nan if v is None else v  # a class absent from the batches: no bar, no dot
    colors = (base["color"], other["color"]) if base["color"] != other["color"] else COLORS[:2]
    for run, c, r, shift, color in zip((base, other), cos, ratio, (-w / 2, w / 2), colors):
        x = [n + shift for n in range(len(shown))]
        ax.bar(x, [nan(c[k]) for k in shown], w, color=color, alpha=0.8, label=f"{run['label']}: cos(g_k, d)")
        if any(r[k] is not None for k in shown):  # a log scale needs a value
            dots.plot(x, [nan(r[k]) for k in shown], "o", color=color, mec="black", ms=5,
                      label=f"{run['label']}: |g_k| / |d|")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([class_name(k, names) + (f"\n{counts[k]}" if k in counts else "") for k in shown], fontsize=8)
    for n in range(1, len(shown)):  # the Many | Medium | Few borders, by training count
        if shown[n] in counts and shown[n - 1] in counts and shot(counts[shown[n]]) != shot(counts[shown[n - 1]]):
            ax.axvline(n - 0.5, color="black", ls="--", lw=0.8)
    for n, k in enumerate(shown):
        if k in counts and (n == 0 or shown[n - 1] not in counts or shot(counts[shown[n - 1]]) != shot(counts[k])):
            ax.text(n - 0.45, 1.0, shot(counts[k]), transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
    ax.set_xlabel("class, head to tail" + (" (training images below)" if counts else " (class id order)"))
    ax.set_ylabel("cos(g_k, d): class k's gradient against the step's update\n(mean over the diagnostic batches)")
    dots.set_ylabel("|g_k| / |d| (dots, log scale)")
    if dots.lines:
        dots.set_yscale("log")
    ax.axhline(0, color="black", lw=0.6)
    when = "mean over the diagnosed epochs" if epoch == "mean" else f"epoch {epoch}"
    fig.suptitle(f"Fig. 2 measure, {when}: {base['label']} ({which(base)}) beside {other['label']} ({which(other)})",
                 fontsize=11)
    bars, bar_labels = ax.get_legend_handles_labels()
    marks, mark_labels = dots.get_legend_handles_labels()
    fig.legend(bars + marks, bar_labels + mark_labels, fontsize=8, loc="lower center", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def which(run):
    """The run a picture shows: 'seed N' when known, else its folder's name."""
    return f"seed {run['seed']}" if run.get("seed") is not None else run["name"]


# --- command line ---------------------------------------------------------------------------------

def diagnosed_epochs(run):
    return {r["epoch"] for r in run["log"] if r.get("diag_cos") is not None}


def diag_epoch(base, other, asked):
    """The epoch for fig2_diagnostic.png: the last one both runs diagnosed, or the one asked for."""
    both = diagnosed_epochs(base) & diagnosed_epochs(other)
    if asked == "last":
        return max(both) if both else None
    if asked == "mean":
        return "mean" if both else None
    if not asked.isdigit() or int(asked) not in both:
        sys.exit(f"--diag-epoch {asked}: both runs diagnosed epochs {sorted(both) or 'none'}; "
                 f"give one of them, last or mean")
    return int(asked)


def save(fig, path):
    """PNG with a 128-colour palette: a third of the bytes of full colour, the same to the eye."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    plt.close(fig)
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def get_args_parser():
    p = argparse.ArgumentParser(prog="plot_runs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (train.py's --output-dir)")
    p.add_argument("--out", required=True, help="folder the PNG files go to (made when missing)")
    p.add_argument("--labels", nargs="+", help="one name per run, in order (default: the folder names)")
    p.add_argument("--diag-pair", nargs=2, type=int, default=None, metavar=("BASE", "OTHER"),
                   help="the two runs fig2_diagnostic.png sets side by side, 0-based in the order given "
                        "(default 0 1: the first run is the baseline, e.g. CE, the second e.g. CE+GBG+MOO)")
    p.add_argument("--diag-epoch", default="last",
                   help="the epoch of fig2_diagnostic.png: last (default: the last both runs diagnosed), an "
                        "epoch number, or mean (per class, the mean over the epochs both runs diagnosed)")
    p.add_argument("--diag-classes", type=int, default=None, metavar="N",
                   help="show the N classes with the most and the N with the fewest training images "
                        "(default: every class up to 20 classes, else 2 and 2 as in the paper)")
    p.add_argument("--smooth", type=int, default=1, metavar="N",
                   help="draw accuracy and update_ratio as the running mean of each run's last N logged "
                        "epochs (default 1: the values as logged); said in the pictures' titles")
    p.add_argument("--class-names", default=None,
                   help="comma-separated class names by class id, for runs whose groups.json does not "
                        "name them (e.g. CIFAR-10's airplane,automobile,...)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.smooth < 1:
        sys.exit(f"--smooth {args.smooth}: give a whole number of epochs, 1 or more")
    if args.labels and len(args.labels) != len(args.runs):
        sys.exit(f"--labels has {len(args.labels)} names for {len(args.runs)} runs: give one per run")
    runs = with_colors([load_run(f, (args.labels or [None] * len(args.runs))[i]) for i, f in enumerate(args.runs)])
    names = args.class_names.split(",") if args.class_names else next(
        (r["groups"]["class_names"] for r in runs if (r["groups"] or {}).get("class_names")), None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pictures = {
        "accuracy.png": draw_accuracy(runs, args.smooth),
        "alpha.png": draw_per_group(runs, "alpha_mean", "alpha", "MGDA's weight alpha per group (alpha_mean: "
                                    "the mean over the epoch's steps; the weights sum to 1)", names),
        "group_loss.png": draw_per_group(runs, "train_group_loss", "training loss",
                                         "each group's training loss (train_group_loss: the mean over the "
                                         "epoch's steps that held the group)", names),
        "update_ratio.png": draw_update_ratio(runs, args.smooth),
    }
    b, o = args.diag_pair or (0, 1)
    if args.diag_pair and not (0 <= b < len(runs) and 0 <= o < len(runs) and b != o):
        sys.exit(f"--diag-pair {b} {o}: give two different run indices from 0 to {len(runs) - 1}")
    epoch = None if len(runs) < 2 else diag_epoch(runs[b], runs[o], args.diag_epoch)
    mismatch = None
    try:
        pictures["fig2_diagnostic.png"] = None if epoch is None else draw_diagnostic(
            runs[b], runs[o], epoch, args.diag_classes, names)
    except ValueError as e:  # runs of different data sets
        pictures["fig2_diagnostic.png"], mismatch = None, str(e)
    why = {"alpha.png": "no run logs alpha_mean (MGDA runs do)",
           "group_loss.png": "no run logs train_group_loss (runs with groups do)",
           "update_ratio.png": "no run logs update_ratio (MGDA runs with --ratio-every do)",
           "fig2_diagnostic.png": "it needs two runs" if len(runs) < 2 else mismatch or
                                  f"{runs[b]['label']} and {runs[o]['label']} have no epoch both diagnosed "
                                  f"(train.py --diag-every N)"}
    for name, fig in pictures.items():
        if fig is None:
            print(f"{out / name}: skipped, {why[name]}")
        else:
            save(fig, out / name)


if __name__ == "__main__":
    main()
