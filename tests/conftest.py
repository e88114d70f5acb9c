"""Shared test helpers: the project root on sys.path, and the independent dense reference."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A data set small enough to train on in a second or two (data.synthetic's arguments).
TINY = dict(num_labels=120, num_topics=6, vocabulary=600, num_train=600, num_test=150)


def dense_reference(x, weight, indices, bias, grad_y):
    """Forward and gradients of the fixed fan-in layer through its dense [L, D] matrix, in float64.

    Built with plain matrix algebra (not autograd through the code under test): W[l, indices[l, j]]
    accumulates weight[l, j], so duplicate indices add up, as they must.
    """
    x, weight, grad_y = x.double(), weight.double(), grad_y.double()
    dense = torch.zeros(weight.shape[0], x.shape[1], dtype=torch.float64)
    dense.scatter_add_(1, indices.long(), weight)
    y = x @ dense.T + (0 if bias is None else bias.double())
    grad_dense = grad_y.T @ x  # [L, D]
    return {
        "y": y,
        "grad_x": grad_y @ dense,
        "grad_weight": grad_dense.gather(1, indices.long()),
        "grad_bias": grad_y.sum(0),
    }


def assert_close(actual, expected, tol, scale=None):
    """|actual - expected| <= tol * (1 + scale), elementwise; `scale` bounds the terms' magnitudes."""
    scale = expected.abs() if scale is None else scale
    error = (actual.double().cpu() - expected).abs()
    bound = tol * (1 + scale)
    assert bool((error <= bound).all()), f"max error {error.max():.3g}, allowed {bound.min():.3g} or more"
