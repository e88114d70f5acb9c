"""What the classifier holds at a paper data set's shape, by kind (weights and biases, AdamW's state,
indices), for the paper's layer and HASTE's groups and dense head: built on PyTorch's meta device
(shapes and dtypes, no memory), one AdamW step taken for its state. The whole run's peak is
bench.py --memory's (memory.py); this is the part that grows with L, at any L in seconds.

    python tools/classifier_bytes.py --labels 2812281 --fan-in 128   # Amazon-3M
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import memory  # noqa: E402
import model  # noqa: E402
from sparse_layer import FixedFanInLinear  # noqa: E402


def held(layer):
    """GiB of the layer's weights and biases, of AdamW's state after a step, and of its indices."""
    optimizer = torch.optim.AdamW(layer.parameters(), foreach=False)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    kinds = memory.classifier_held(layer, optimizer)  # what bench.py --memory reports of a run's classifier
    return [kinds[f"classifier: {kind}"] / 2**30 for kind in ("weights, biases", "optimizer state", "indices")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labels", type=int, default=670_091)
    p.add_argument("--features", type=int, default=768)
    p.add_argument("--fan-in", type=int, default=128)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--dense-head", type=float, default=0.05)
    args = p.parse_args(argv)
    L, D, k, G = args.labels, args.features, args.fan_in, args.group_size
    head = model.head_size(args.dense_head, L, G)
    print(f"L = {L:,}, D = {D}, k = {k}: GiB of weights and biases, AdamW state, indices")
    with torch.device("meta"):
        for name, layer in [("G = 1", lambda: FixedFanInLinear(D, L, k)),
                            (f"G = {G}", lambda: FixedFanInLinear(D, L, k, group_size=G)),
                            (f"G = {G}, dense head of {head:,}", lambda: model.HeadAndTail(D, L, head, k, G, "torch"))]:
            print(f"{name}: " + ", ".join(f"{value:.3f}" for value in held(layer())))


if __name__ == "__main__":
    main()
