"""Mixed precision on the CPU, standing in for a GPU's: the lean losses' gradients on 16-bit scores
against float64, real training steps under CPU autocast (bfloat16; float16 with an enabled
GradScaler("cpu")) against float32, the scaler skipping a non-finite step, and evaluation under
autocast against float32 top-k."""
import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch

import data
import evaluate
import model
import train
from config import Config
from conftest import TINY
from test_model import DENSE_LOSSES


def relative_error(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("name", list(DENSE_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lean_losses_keep_the_gradient_of_16_bit_scores_at_the_papers_scale(name, dtype):
    """B * L = 12.8M: 1/(B*L) times a slope is below fp16's smallest number, so the mean losses must
    not scale their gradient before the gradient scaler's factor (2^16, its default start) reaches
    it. The bound: plain autograd on `.float()` scores, which rounds once, times 2."""
    generator = torch.Generator().manual_seed(0)
    batch, labels = 64, 200_000
    base = torch.randn(labels, batch, generator=generator) * 2
    rows = torch.randint(0, batch, (500,), generator=generator)
    positives = torch.randint(0, labels, (500,), generator=generator)
    factor = 2.0 ** 16 if name != "bce" else 1.0  # a summed loss's slopes need no scaling up in fp16
    scores = base.to(dtype).T.requires_grad_()  # the layer's transposed view
    (model.LOSSES[name](scores, rows, positives) * factor).backward()
    s64 = scores.detach().double().requires_grad_()
    target = torch.zeros_like(s64)
    target[rows, positives] = 1
    DENSE_LOSSES[name](s64, target).backward()
    plain = scores.detach().clone().requires_grad_()
    (DENSE_LOSSES[name](plain.float(), target.float()) * factor).backward()
    lean_error = relative_error(scores.grad.double() / factor, s64.grad)
    plain_error = relative_error(plain.grad.double() / factor, s64.grad)
    assert plain_error < (5e-4 if dtype == torch.float16 else 4e-3)
    assert lean_error <= 2 * plain_error, (lean_error, plain_error)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "synthetic", functools.partial(data.synthetic, **TINY))
    return Config(out=str(tmp_path / "run"), epochs=2, dim=32, intermediate=64, fan_in=8, batch_size=32,
                  warmup_steps=2, lr_encoder=1e-3, rewire_interval=10, aux_weight=0.4, aux_epochs=2, max_leaf=20,
                  dropout=0.0, device="cpu")


def steps(config, dtype, monkeypatch, count):
    """`count` - 1 optimizer steps, then one more batch's backward pass, under CPU autocast to `dtype`
    (None: float32); the weights before and after, and the last gradients with the scaler's factor
    taken out."""
    monkeypatch.setattr(train, "autocast_dtype", lambda precision, device: dtype)
    xmc = data.synthetic()
    torch.manual_seed(0)
    state = train.set_up(config, "synthetic", xmc, torch.arange(xmc.num_labels) % 8, torch.device("cpu"))
    assert state.autocast == dtype and state.scaler.is_enabled() == (dtype == torch.float16)
    before = {n: p.detach().clone() for n, p in state.network.named_parameters()}
    for number, batch in enumerate(list(data.batches(xmc.train, 32, shuffle=True))[:count], start=1):
        train.train_step(config, state, batch, torch.device("cpu"), 1, last=number < count)
    after = {n: p.detach().clone() for n, p in state.network.named_parameters()}
    grads = {n: p.grad.double() / state.scaler.get_scale() for n, p in state.network.named_parameters()
             if p.grad is not None}
    return before, after, grads


@pytest.mark.parametrize("sparse", [True, False])  # dense: the classifier's scores come out in 16 bit
@pytest.mark.parametrize("dtype, gradient_tolerance, weight_tolerance",
                         [(torch.bfloat16, 1e-2, 0.1), (torch.float16, 2e-3, 0.05)])
def test_training_steps_under_cpu_autocast_match_float32(tiny, monkeypatch, sparse, dtype, gradient_tolerance,
                                                         weight_tolerance):
    """Five optimizer steps and a sixth batch's gradients, under autocast against float32: every
    gradient within `gradient_tolerance` (relative L2), every weight's change within `weight_tolerance`
    of float32's change."""
    config = dataclasses.replace(tiny, sparse=sparse)
    start, exact, exact_grads = steps(config, None, monkeypatch, 6)
    _, mixed, mixed_grads = steps(config, dtype, monkeypatch, 6)
    assert set(mixed_grads) == set(exact_grads)
    for name, grad in exact_grads.items():
        assert relative_error(mixed_grads[name], grad) < gradient_tolerance, name
    for name, weight in exact.items():
        if not torch.equal(weight, start[name]):
            assert relative_error(mixed[name] - start[name], weight - start[name]) < weight_tolerance, name


def test_the_fp16_scaler_skips_a_non_finite_step_logs_it_and_trains_on(tiny, monkeypatch):
    monkeypatch.setattr(train, "autocast_dtype", lambda precision, device: torch.float16)
    calls = []

    def poisoned(scores, rows, labels, **options):  # batch 5 of 38 gives an infinite loss
        calls.append(1)
        return model.squared_hinge(scores, rows, labels, **options) * (float("inf") if len(calls) == 5 else 1.0)

    monkeypatch.setitem(model.LOSSES, "squared_hinge", poisoned)
    results = train.run(tiny)
    log = [json.loads(line) for line in open(Path(tiny.out) / "log.jsonl")]
    assert [record["skipped_steps"] for record in log] == [1, 0] and results["P@1"] > 0
    saved = torch.load(Path(tiny.out) / "checkpoint.pt", weights_only=True)
    assert saved["scaler"]["scale"] == 2.0 ** 11  # 2^12, halved once
    assert all(bool(torch.isfinite(t).all()) for t in saved["network"].values())


def test_a_loss_that_stays_non_finite_stops_the_fp16_run(tiny, monkeypatch):
    monkeypatch.setattr(train, "autocast_dtype", lambda precision, device: torch.float16)
    calls = []

    def diverged(scores, rows, labels, **options):  # NaN from batch 22 on (the second epoch)
        calls.append(1)
        return model.squared_hinge(scores, rows, labels, **options) * (float("nan") if len(calls) > 22 else 1.0)

    monkeypatch.setitem(model.LOSSES, "squared_hinge", diverged)
    limit = train.NON_FINITE_LIMIT
    with pytest.raises(FloatingPointError, match=rf"at batch 31 \(non-finite {limit} batches in a row"):
        train.run(tiny)
    assert torch.load(Path(tiny.out) / "checkpoint.pt", weights_only=True)["batches_done"] == 19


@pytest.mark.parametrize("sparse", [True, False])
def test_evaluation_under_autocast_ranks_as_float32_up_to_ties(tiny, sparse):
    """The labels chosen under bfloat16 autocast have, by the float32 scores, the float32 top-k's
    values up to bfloat16's rounding of the scores."""
    config = dataclasses.replace(tiny, sparse=sparse)
    xmc = data.synthetic()
    torch.manual_seed(0)
    network = train.set_up(config, "synthetic", xmc, None, torch.device("cpu")).network
    exact_labels, exact_values = evaluate.predict_top_k(network, data.batches(xmc.test, 64), 5, "cpu")
    mixed_labels, _ = evaluate.predict_top_k(network, data.batches(xmc.test, 64), 5, "cpu", torch.bfloat16)
    with torch.no_grad():
        scores = torch.cat([network(batch)[0] for batch in data.batches(xmc.test, 64)]).numpy()
    chosen = torch.from_numpy(scores).gather(1, torch.from_numpy(mixed_labels)).sort(1, descending=True).values
    tolerance = 2 ** -7 * float(abs(scores).max())
    assert float((chosen - torch.from_numpy(exact_values)).abs().max()) <= tolerance
    assert (mixed_labels == exact_labels).mean() > 0.5  # and mostly the very same labels


@pytest.mark.parametrize("eval_fp32", [False, True])
def test_evaluation_runs_under_the_runs_autocast_unless_fp32_is_asked(tiny, monkeypatch, eval_fp32):
    monkeypatch.setattr(train, "autocast_dtype", lambda precision, device: torch.bfloat16)
    seen, predict_top_k = [], evaluate.predict_top_k
    monkeypatch.setattr(evaluate, "predict_top_k", lambda *args: seen.append(args[4]) or predict_top_k(*args))
    train.run(dataclasses.replace(tiny, epochs=1, eval_fp32=eval_fp32, validation_fraction=0.1))
    assert seen == [None if eval_fp32 else torch.bfloat16] * 2  # the test and the validation split
    saved = {"config": {"precision": "fp16", "eval_fp32": eval_fp32}}  # evaluate.py --checkpoint does the same
    assert evaluate.run_autocast(saved, "cuda") == (None if eval_fp32 else torch.float16)
    assert evaluate.run_autocast(saved, "cpu") is None
