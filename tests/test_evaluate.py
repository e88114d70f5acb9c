"""P@k, nDCG@k and PSP@k against a plain per-document computation, and batched top-k (also of the
sparse layer's transposed scores, without a copy)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import data
import evaluate
from conftest import FixedScores


def to_csr(lists):
    return data.offsets_of([len(x) for x in lists]), np.array([v for x in lists for v in x], dtype=np.int64)


@st.composite
def rankings(draw):
    num_labels = draw(st.integers(5, 30))
    num_docs = draw(st.integers(1, 20))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    truth = [sorted(rng.choice(num_labels, rng.integers(0, 6), replace=False).tolist()) for _ in range(num_docs)]
    predictions = np.stack([rng.permutation(num_labels)[:5] for _ in range(num_docs)])
    frequencies = rng.integers(0, 50, num_labels)
    return truth, predictions, frequencies, num_labels


def brute_force(truth, predictions, inverse_propensity, k):
    precision, ndcg, psp_gain, psp_best = [], [], 0.0, 0.0
    for labels, ranked in zip(truth, predictions):
        labels = set(labels)
        top = list(ranked[:k])
        precision.append(sum(l in labels for l in top) / k)
        dcg = sum(1 / math.log2(r + 2) for r, l in enumerate(top) if l in labels)
        ideal = sum(1 / math.log2(r + 2) for r in range(min(k, len(labels))))
        ndcg.append(dcg / ideal if ideal else 0.0)
        psp_gain += sum(inverse_propensity[l] for l in top if l in labels)
        psp_best += sum(sorted((inverse_propensity[l] for l in labels), reverse=True)[:k])
    return {f"P@{k}": 100 * np.mean(precision), f"nDCG@{k}": 100 * np.mean(ndcg),
            f"PSP@{k}": 100 * psp_gain / psp_best if psp_best else 0.0}


@settings(max_examples=200, deadline=None)
@given(rankings())
def test_metrics_match_brute_force(ranking):
    truth, predictions, frequencies, num_labels = ranking
    offsets, ids = to_csr(truth)
    inverse = evaluate.inverse_propensities(frequencies, 100)
    results = evaluate.metrics(predictions, offsets, ids, inverse)
    for k in evaluate.KS:
        for name, value in brute_force(truth, predictions, inverse, k).items():
            assert results[name] == pytest.approx(value, abs=1e-9), name


def test_propensities_follow_jain_et_al():
    # N = 1000 documents, A = 0.55, B = 1.5: C = (ln 1000 - 1) * 2.5^0.55
    c = (math.log(1000) - 1) * 2.5 ** 0.55
    inverse = evaluate.inverse_propensities(np.array([0, 10, 1000]), 1000)
    assert inverse == pytest.approx([1 + c * 1.5 ** -0.55, 1 + c * 11.5 ** -0.55, 1 + c * 1001.5 ** -0.55])
    assert inverse[0] > inverse[1] > inverse[2] > 1  # rare labels weigh more


def test_perfect_ranking_scores_100():
    truth = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    offsets, ids = to_csr(truth)
    results = evaluate.metrics(np.array(truth), offsets, ids, evaluate.inverse_propensities(np.ones(10), 10))
    assert all(value == pytest.approx(100) for value in results.values())


def test_batched_top_k_equals_full_sort():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(23, 40, generator=generator)
    split = data.Split(np.zeros(24, dtype=np.int64), np.zeros(0, dtype=np.int32))
    labels, values = evaluate.predict_top_k(FixedScores(scores), data.batches(split, 5), 5, "cpu")
    assert np.array_equal(labels, scores.argsort(dim=1, descending=True)[:, :5].numpy())
    assert np.allclose(values, scores.sort(dim=1, descending=True).values[:, :5].numpy())


class TopKInputs(TorchDispatchMode):
    """Records whether each aten top-k reads a contiguous input (CUDA's copies any other first)."""

    def __init__(self):
        super().__init__()
        self.contiguous = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.topk.default:
            self.contiguous.append(args[0].is_contiguous())
        return func(*args, **(kwargs or {}))


def test_top_k_of_the_layers_transposed_scores_ranks_its_buffer_without_a_copy():
    """The sparse layer's scores are a [B, L] view of an [L, B] buffer: ranked down the buffer's
    columns, as a contiguous copy would be ranked along its rows."""
    generator = torch.Generator().manual_seed(0)
    buffer = torch.randn(40, 23, generator=generator)
    split = data.Split(np.zeros(24, dtype=np.int64), np.zeros(0, dtype=np.int32))
    with TopKInputs() as seen:
        labels, values = evaluate.predict_top_k(FixedScores(buffer.T), data.batches(split, 23), 5, "cpu")
    assert seen.contiguous == [True]
    expected = buffer.T.contiguous().topk(5, dim=1)
    assert np.array_equal(labels, expected.indices.numpy()) and np.array_equal(values, expected.values.numpy())


def test_the_validation_split_is_scored_against_its_own_labels_with_the_whole_training_splits_propensities():
    rng = np.random.default_rng(4)
    truth = [sorted(rng.choice(12, rng.integers(0, 4), replace=False).tolist()) for _ in range(30)]
    offsets, ids = to_csr(truth)
    train = data.Split(offsets, ids.astype(np.int32))
    empty = data.Split(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32))
    xmc = data.XMCData("toy", train, empty, num_labels=12)
    rows = np.array([2, 3, 7, 11, 19, 25])
    scores = torch.randn(len(rows), 12, generator=torch.Generator().manual_seed(1))
    results = evaluate.evaluate(FixedScores(scores), xmc, data.batches(train, 4, rows=rows), "cpu", rows=rows)
    frequencies = np.array([sum(l in labels for labels in truth) for l in range(12)])  # all 30 documents
    inverse = evaluate.inverse_propensities(frequencies, 30)
    predictions = scores.argsort(dim=1, descending=True).numpy()
    for k in evaluate.KS:
        for name, value in brute_force([truth[r] for r in rows], predictions, inverse, k).items():
            assert results[name] == pytest.approx(value, abs=1e-9), name
