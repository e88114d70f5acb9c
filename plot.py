"""Pictures of runs: the curves the paper's figures show, and dynamic sparsity at work.

    python plot.py RUN_DIR [RUN_DIR ...] --out curves.png     # from each run's log.jsonl
    python plot.py --checkpoint RUN_DIR/checkpoint.pt --out dst.png

Curves (paper, Figures 1-3: precision against epochs, for several models): P@1, P@5 and PSP@5 per
epoch with each run's best epoch marked; the main loss, the auxiliary loss and its weight s (Section
4: the auxiliary objective decayed to zero); and for sparse runs, the connections each epoch rewired
and the share of the last regrowth that survived the next rewire (Section 3, SET). Runs are named
by their folders.

DST diagnostics from a checkpoint of a sparse run (what rewiring did to the fixed fan-in layer):
how many labels read each input feature, sorted, against the k*L/D a uniform draw would give; the
|weight| at each slot rank of a label (its largest first); and how labels from head to tail spend
their fan-in, as the effective number of connections a label uses, (sum |w|)^2 / sum w^2, which is k
for equal weights and 1 for a single one.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from checkpoint import load_checkpoint  # noqa: E402
from sparse_layer import random_distinct_indices  # noqa: E402

WIDTH = 12  # inches: the figures are read at README width


def read_log(run):
    """(epoch records, step records) of a run folder's log.jsonl; a half-written last line is skipped."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise SystemExit(f"plot.py: {path} not found: give run folders made by train.py (they hold log.jsonl)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if "kind" not in r], [r for r in records if r.get("kind") == "step"]


def curve(axis, records, key, label, **style):
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    if points:
        axis.plot(*zip(*points), label=label, **style)
    return points


def plot_runs(runs, out):
    figure, axes = plt.subplots(2, 3, figsize=(WIDTH, 7), constrained_layout=True)
    s_axis, survival_axis = axes[1, 1].twinx(), axes[1, 2].twinx()  # right-hand scales
    for number, run in enumerate(runs):
        epochs, _ = read_log(run)
        name, color = Path(run).name, f"C{number}"
        best = epochs[-1].get("best_epoch") if epochs else None  # by P@1 of validation (else test), as train.py keeps it
        for axis, key in zip(axes[0], ("P@1", "P@5", "PSP@5")):
            points = curve(axis, epochs, key, name, color=color, marker=".")
            if best is not None and any(e == best for e, _ in points):
                axis.plot(*next(p for p in points if p[0] == best), marker="*", markersize=13, color=color)
        curve(axes[1, 0], epochs, "main", name, color=color)
        if any(r.get("aux_weight") for r in epochs):
            curve(axes[1, 1], epochs, "aux", name, color=color)
            curve(s_axis, epochs, "aux_weight", f"{name}: s", color=color, linestyle=":")
        if any(r.get("rewired") for r in epochs):
            curve(axes[1, 2], epochs, "rewired", name, color=color, marker=".")
            curve(survival_axis, epochs, "survived", f"{name}: survived", color=color, linestyle=":")
    for axis, key in zip(axes[0], ("P@1", "P@5", "PSP@5")):
        axis.set(title=f"test {key} (* best epoch)", xlabel="epoch", ylabel=f"{key} (%)")
    axes[1, 0].set(title="main loss (training, epoch mean)", xlabel="epoch", ylabel="loss", yscale="log")
    axes[1, 1].set(title="auxiliary loss (solid), its weight s (dotted)", xlabel="epoch", ylabel="aux loss")
    s_axis.set_ylabel("s")
    axes[1, 2].set(title="rewired (solid), regrowth survived (dotted)", xlabel="epoch", ylabel="connections")
    survival_axis.set_ylabel("share of the last regrowth alive")
    for axis in (*axes[0], axes[1, 0]):
        if axis.has_data():
            axis.legend(fontsize=8)
    figure.savefig(out, dpi=80)
    print(f"wrote {out}")


def classifier_inputs(saved, path):
    """D, the classifier's input width: the intermediate layer's, the bag-of-words encoder's, or
    the transformer's hidden size from the run's encoder/config.json."""
    if "intermediate.0.weight" in saved["network"]:
        return saved["network"]["intermediate.0.weight"].shape[0]
    arguments = saved["model_arguments"]
    if arguments["encoder"] == "bow":
        return arguments["dim"]
    config = json.loads((Path(path).parent / "encoder" / "config.json").read_text())
    return config.get("hidden_size") or config["dim"]


def effective_fan_in(weight):
    """Per label, (sum |w|)^2 / sum w^2: k for k equal weights, 1 for a single nonzero one."""
    magnitude = weight.abs().double()
    return magnitude.sum(1) ** 2 / (magnitude.square().sum(1) + 1e-30)


def plot_checkpoint(path, out):
    try:
        saved = load_checkpoint(path)
    except (ValueError, OSError) as error:  # missing, damaged, foreign: checkpoint.py's one line
        raise SystemExit(f"plot.py: {error}")
    if "label_position" in saved["network"]:  # rows by group, labels in the classifier's own order
        raise SystemExit(f"plot.py: {path} holds HASTE's classifier (--group-size, --dense-head): not drawn here")
    if "classifier.indices" not in saved["network"]:
        raise SystemExit(f"plot.py: {path} holds a dense classifier: no connectivity to show")
    weight, indices = saved["network"]["classifier.weight"].float(), saved["network"]["classifier.indices"].long()
    (labels, fan_in), features = weight.shape, classifier_inputs(saved, path)
    figure, axes = plt.subplots(1, 3, figsize=(WIDTH, 3.8), constrained_layout=True)

    readers = torch.bincount(indices.flatten(), minlength=features).sort(descending=True).values
    drawn = random_distinct_indices(labels, features, fan_in, torch.Generator().manual_seed(0))
    uniform = torch.bincount(drawn.flatten().long(), minlength=features).sort(descending=True).values
    axes[0].plot(readers.numpy(), label="this run")
    axes[0].plot(uniform.numpy(), color="gray", label="a uniform random draw (the start)")
    axes[0].axhline(fan_in * labels / features, color="k", linestyle="--", label=f"k*L/D = {fan_in * labels / features:.0f}")
    axes[0].set(title="labels reading each input feature", xlabel="input features, most read first",
                ylabel="labels")
    axes[0].legend(fontsize=8)

    ranked = weight.abs().sort(dim=1, descending=True).values.numpy()  # [L, k], a label's largest |w| first
    low, median, high = np.percentile(ranked, [10, 50, 90], axis=0)
    slots = np.arange(1, fan_in + 1)
    axes[1].fill_between(slots, low, high, alpha=0.3, label="10th-90th percentile")
    axes[1].plot(slots, median, label="median")
    axes[1].set(title="|weight| by slot rank within a label", xlabel="slot rank (1: largest |w|)",
                ylabel="|weight|", yscale="log")
    axes[1].legend(fontsize=8)

    if "label_counts" in saved:  # head to tail: labels by training frequency, in ten equal groups
        order = torch.as_tensor(saved["label_counts"]).long().argsort(descending=True, stable=True)
        groups = np.array_split(effective_fan_in(weight)[order].numpy(), 10)
        axes[2].bar(np.arange(1, 11), [g.mean() for g in groups])
        axes[2].axhline(fan_in, color="k", linestyle="--", label=f"k = {fan_in}")
        axes[2].set(title="fan-in used, head to tail", xlabel="label decile by training frequency (1: head)",
                    ylabel="effective connections")
        axes[2].legend(fontsize=8)
    else:
        axes[2].set_axis_off()
        axes[2].text(0.5, 0.5, "no label counts in this checkpoint\n(written by an older train.py)",
                     ha="center", va="center")
    figure.suptitle(f"{Path(path).parent.name}: L = {labels:,} labels, D = {features}, k = {fan_in}", fontsize=10)
    figure.savefig(out, dpi=80)
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", help="run folders (train.py --out), drawn together")
    parser.add_argument("--checkpoint", help="a checkpoint of a sparse run: the DST diagnostics instead")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.checkpoint):
        parser.error("give run folders, or --checkpoint, not both")
    if args.checkpoint:
        plot_checkpoint(args.checkpoint, args.out)
    else:
        plot_runs(args.runs, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
