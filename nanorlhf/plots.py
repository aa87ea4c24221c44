"""Learning curves: plot a run's metrics.jsonl, or overlay several runs.

    python -m nanorlhf.plots runs/ppo                      # -> runs/ppo/curves.png
    python -m nanorlhf.plots runs/ppo runs/ppo-no-kl -o kl.png

Every stage calls this when it ends (Metrics.close), so output_dir/curves.png shows the run.
matplotlib is optional (pip install matplotlib): without it the stages skip the plot silently.
"""

import argparse
import json
import os

from nanorlhf.errors import UserError, run_main
from nanorlhf.files import atomic_write

# The curves that tell a healthy run from a sick one, in the order they are drawn; a panel is
# drawn for each one the runs logged. PT/SFT: loss; RM: accuracy too; PPO: score, KL, entropy...
CURVES = ["loss", "eval/loss", "accuracy", "eval/accuracy", "rewards/accuracies", "eval/rewards/accuracies",
          "rewards/margins",
          "objective/scores", "objective/rm_scores", "objective/fn_scores", "objective/kl", "objective/entropy",
          "val/response_length", "policy/clipfrac_avg"]


def read_metrics(run_dir):
    """The rows of run_dir/metrics.jsonl (a list of dicts with "step")."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: no metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(runs, path, keys=CURVES, title=""):
    """Draw one panel per key that any run logged, one line per run: runs is {label: rows}.
    Writes path (atomically) and returns it; returns None if matplotlib is not installed or
    there is nothing to draw."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k in keys if any(k in row for rows in runs.values() for row in rows)]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows_ = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3 * rows_), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if len(runs) > 1:  # one legend for all panels, to their right (bbox_inches="tight" makes room)
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize="small")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def scatter(points, path, xlabel, ylabel, title="", xscale="linear"):
    """One marker per point, one colour per label: points is {label: [(x, y), ...]}. Writes path (atomically)
    and returns it; None without matplotlib or points. xscale "symlog": linear below 1, logarithmic above."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not any(points.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, xy in points.items():
        if xy:
            ax.scatter(*zip(*xy), label=label, s=30)
    if xscale == "symlog":
        ax.set_xscale("symlog", linthresh=1.0)
    else:
        ax.set_xscale(xscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def trajectories(runs, path, xkey, panels, xlabel="", title=""):
    """One panel per y key (panels: {key: axis label}), each run a line through its points in order, one
    colour per label: runs is {label: [[row, ...] per run]}, rows holding xkey and the panel keys. Writes
    path (atomically) and returns it; None without matplotlib or points."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not any(rows for lines in runs.values() for rows in lines):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes.flat, panels.items()):
        for i, (name, lines) in enumerate(runs.items()):
            for j, rows in enumerate(lines):
                points = [(r[xkey], r[key]) for r in rows if key in r]
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, color=colours[i % len(colours)],
                            alpha=0.8, label=name if j == 0 else None)
        ax.set_xlabel(xlabel or xkey)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize="small")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_run(run_dir):
    """output_dir/curves.png from output_dir/metrics.jsonl (None without matplotlib or metrics)."""
    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        return None
    return plot({os.path.basename(os.path.normpath(run_dir)): read_metrics(run_dir)},
                os.path.join(run_dir, "curves.png"))


def short_names(paths):
    """The fewest trailing path parts that tell the runs apart: runs/a/seed-1, runs/b/seed-1 -> a/seed-1, b/seed-1."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return list(paths)  # the same run named twice


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("-o", "--output", default="", help="the PNG to write (default: RUN/curves.png for one "
                        "run, curves.png here for several)")
    parser.add_argument("--keys", default="", help="comma-separated metric names (default: the usual curves)")
    args = parser.parse_args()
    runs = dict(zip(short_names(args.runs), map(read_metrics, args.runs)))
    output = args.output or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1 else "curves.png")
    keys = args.keys.split(",") if args.keys else CURVES
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    if plot(runs, output, keys) is None:
        raise UserError(f"none of {', '.join(keys)} is in the runs' metrics.jsonl")
    print(output)


if __name__ == "__main__":
    run_main(main)
