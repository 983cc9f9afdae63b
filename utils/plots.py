"""Training curves from metrics.jsonl rows: one run (curves.png, redrawn after every epoch) or
several overlaid on the same axes (tools/plot_runs.py)."""
import itertools
import json
import os

from .io import atomic_write


def read_metrics(path):
    """The rows of a metrics.jsonl file (a line cut short by a kill is skipped)."""
    rows = []
    with open(path) as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def plot_runs(runs, path, metrics, title=None):
    """Draw loss and lr by iteration and the validation results named in `metrics` (those a run
    has; an evaluator's curves) by epoch, one colour per run, the best epoch of each run marked;
    `runs` is a list of (label, rows). Written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, (loss_axis, lr_axis, val_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, rows) in enumerate(runs):
        colour = colours[index % len(colours)]
        steps = [row for row in rows if row.get("kind") == "iteration"]
        epochs = [row for row in rows if row.get("kind") == "epoch"]
        if steps:
            loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], color=colour,
                           label=label, linewidth=1)
            lr_axis.plot([r["step"] for r in steps], [r["lr"] for r in steps], color=colour, label=label)
        elif epochs:
            loss_axis.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-",
                           color=colour, label=label)
            lr_axis.plot([r["step"] for r in epochs], [r["lr"] for r in epochs], "o-", color=colour, label=label)
        for dataset in (epochs[-1]["val"] if epochs else {}):
            for metric, style in zip(metrics, itertools.cycle(("-", "--"))):
                points = [(r["epoch"], r["val"][dataset][metric]) for r in epochs
                          if metric in r["val"].get(dataset, {})]
                if points:
                    name = f"{label} {dataset} {metric}" if len(epochs[-1]["val"]) > 1 else f"{label} {metric}"
                    val_axis.plot(*zip(*points), style, marker="o", markersize=3, color=colour, label=name)
        if epochs:
            best = max(epochs, key=lambda r: r["score"])
            val_axis.plot([best["epoch"]], [best["score"]], "*", markersize=14, color=colour,
                          markeredgecolor="black", label=f"{label} best {best['score_name']} "
                                                          f"{best['score']:.2f} (epoch {best['epoch']})")
    val_axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    loss_axis.set(title="training loss", xlabel="iteration")
    lr_axis.set(title="learning rate", xlabel="iteration")
    val_axis.set(title="validation (%)", xlabel="epoch")
    for axis in (loss_axis, lr_axis, val_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, fsync=False) as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
