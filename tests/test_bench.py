"""bench.py checks every layer against its dense float64 equivalent before it times it."""
import pytest
import torch

import bench
import sparse_layer


def step_inputs(batch=6, labels=40, features=24):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, features, generator=generator)
    return x, *bench.random_positives(batch, labels, 3, generator)


@pytest.mark.parametrize("kind", ["dense", "torch", "torch/g4"])
def test_a_correct_layer_passes_the_step_check(kind):
    x, rows, labels = step_inputs()
    bench.check_step(bench.make_layer(kind, 40, 24, 5, torch.float32, torch.device("cpu")), x, rows, labels)


@pytest.mark.parametrize("broken", ["forward", "grad_input", "grad_weight"])
def test_a_wrong_layer_cannot_post_a_time(broken, monkeypatch):
    original = getattr(sparse_layer.TorchOps, broken)
    monkeypatch.setattr(sparse_layer.TorchOps, broken, staticmethod(lambda *args: original(*args) * 1.01))
    x, rows, labels = step_inputs()
    with pytest.raises(AssertionError):
        bench.check_step(bench.make_layer("torch", 40, 24, 5, torch.float32, torch.device("cpu")), x, rows, labels)


@pytest.mark.parametrize("wrong", [0, 1, 3])  # grad-x, grad-w, grad-bias of HASTE's grouped layer
def test_a_wrong_grouped_layer_cannot_post_a_time(wrong, monkeypatch):
    original = bench.grouped.GroupedFanIn.backward
    off = lambda ctx, grad_y: tuple(g * 1.01 if i == wrong else g for i, g in enumerate(original(ctx, grad_y)))
    monkeypatch.setattr(bench.grouped.GroupedFanIn, "backward", staticmethod(off))
    x, rows, labels = step_inputs()
    with pytest.raises(AssertionError):
        bench.check_step(bench.make_layer("torch/g4", 40, 24, 5, torch.float32, torch.device("cpu")), x, rows, labels)


def test_a_failing_sparse_layer_is_one_line_and_dense_failures_stop_the_run(capsys):
    with bench.report_failure("cuda"):
        raise AssertionError("grad x: Tensor-likes are not close!\nMismatched elements: 3 / 96")
    assert capsys.readouterr().out == "| sparse/cuda | FAILED: AssertionError: grad x: Tensor-likes are not close! |\n"
    with pytest.raises(RuntimeError):
        with bench.report_failure("dense"):
            raise RuntimeError("the baseline must not fail quietly")


def test_every_timed_layer_row_is_checked_first(monkeypatch):
    """bench.py's layer rows (not only --step) refuse a wrong layer before timing it."""
    original = sparse_layer.TorchOps.grad_weight
    monkeypatch.setattr(sparse_layer.TorchOps, "grad_weight", staticmethod(lambda *args: original(*args) * 1.01))
    args = type("Args", (), dict(labels=40, features=24, repeats=1, throughput=False))
    inputs = [torch.randn(6, 24, requires_grad=True)]
    bench.time_layer(args, "dense", 5, torch.float32, torch.device("cpu"), inputs)
    with pytest.raises(AssertionError, match="grad weight"):
        bench.time_layer(args, "torch", 5, torch.float32, torch.device("cpu"), inputs)
