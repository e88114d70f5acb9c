"""memory.py: the CPU count of what a GPU run allocates (against sizes computed by hand), the `cuda`
backend's allocations with the torch backend's values (against the dense reference), a whole run's
phases at a tiny size, and that recomputing the encoder's activations trains the very same weights."""
import dataclasses

import pytest
import torch

import memory
import sparse_layer
import train
from config import Config
from conftest import dense_reference, tiny_bert


def test_the_counter_follows_each_storage_from_creation_to_release():
    with memory.Counter() as counter:
        a = torch.zeros(1000, 250)  # 1 MB
        b = a * 2
        view = b[:10].T  # no storage of its own
        assert (counter.live, counter.peak) == (2_000_000, 2_000_000) and view.shape == (250, 10)
        del b, view
        assert (counter.live, counter.peak) == (1_000_000, 2_000_000)
        with counter.pause():
            c = torch.ones(500)  # not counted, then or ever
        a.add_(c.sum())  # in place: nothing new
        assert counter.live == 1_000_000
    with memory.Counter(sort_scratch=True) as counter:
        keys = torch.randint(0, 100, (1000,), dtype=torch.int32)
        torch.sort(keys, stable=True)  # outputs 4 + 8 bytes a key, CUDA's scratch 8 + 4 + 8 more
        assert counter.peak == 4000 + 12_000 + 20_000


def test_a_layer_that_keeps_no_transposed_connectivity_builds_it_in_every_backward_pass():
    layer, x = sparse_layer.FixedFanInLinear(40, 70, 6), torch.randn(5, 40, requires_grad=True)
    layer(x).sum().backward()
    assert len(layer._transposed) == 1  # kept: the next backward pass reads it
    layer.keep_slots_by_input = False
    layer(x).sum().backward()
    assert layer._transposed == {}


def test_a_backward_pass_never_holds_its_own_transposed_connectivity_beside_grad_w(monkeypatch):
    """Without a kept copy, the slots by input (L*k int32) are built a run at a time, never whole
    beside grad-w's [L, k] in float32: the backward pass's peak holds one [L, k] buffer, never two
    (runs of 1,024 slots)."""
    monkeypatch.setattr(sparse_layer, "SORT_SLOTS", 1024)
    with memory.Counter() as counter, memory.as_on_a_gpu(counter):
        layer, x = sparse_layer.FixedFanInLinear(64, 4000, 16), torch.randn(8, 64, requires_grad=True)
        layer.keep_slots_by_input = False
        y = layer(x)
        grad_y = torch.randn(y.shape)
        before, counter.peak = counter.live, counter.live
        y.backward(grad_y)
    grad_yT, slots = 4000 * 8 * 4, 4000 * 16 * 4  # bytes: by hand
    assert grad_yT + slots <= counter.peak - before < grad_yT + 2 * slots


def test_attention_and_dropout_are_counted_as_a_gpus_fused_kernels_compute_them():
    """The same values and gradients as the CPU's ops (dropout's random draws included), counted
    as a GPU allocates: no [B, H, T, T] matrix, and dropout's mask one byte an element."""
    batch, heads, tokens, width = 2, 3, 64, 8
    q, k, v = (torch.randn(batch, heads, tokens, width, requires_grad=True) for _ in range(3))
    weights = torch.randn(batch, heads, tokens, width)

    def attention_and_its_gradients(function):
        torch.manual_seed(1)
        output = function(q, k, v, dropout_p=0.3)
        return output, torch.autograd.grad((output * weights).sum(), (q, k, v))

    expected = attention_and_its_gradients(torch.nn.functional.scaled_dot_product_attention)
    with memory.Counter() as counter:
        actual = attention_and_its_gradients(memory.fused_attention(counter))
    assert torch.equal(actual[0], expected[0]) and all(map(torch.equal, actual[1], expected[1]))
    one = q.numel() * 4  # bytes of a [B, H, T, d] tensor in float32
    assert counter.peak < 7 * one < batch * heads * tokens * tokens * 4  # by hand: far below one score matrix
    x = torch.randn(1000, 100, requires_grad=True)
    with memory.Counter() as counter:
        y = memory.fused_dropout(x, 0.1)
        assert counter.live == x.numel() * (4 + 1) and y.shape == x.shape  # the output and a bool mask
    assert memory.fused_dropout(x, 0.1, training=False) is x


def test_the_emulated_cuda_backend_computes_the_layers_function():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(9, 40, generator=generator, requires_grad=True)
    layer = sparse_layer.FixedFanInLinear(40, 700, 6, generator=generator)
    with memory.Counter() as counter, memory.as_on_a_gpu(counter):
        y = layer(x)
        grad_y = torch.randn(y.shape, generator=generator)
        y.backward(grad_y)
    expected = dense_reference(x.detach(), layer.weight.detach(), layer.indices, layer.bias.detach(), grad_y)
    for actual, name in ((y, "y"), (x.grad, "grad_x"), (layer.weight.grad, "grad_weight"), (layer.bias.grad, "grad_bias")):
        torch.testing.assert_close(actual.double(), expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_a_runs_phases_at_a_tiny_size_and_their_extrapolation_from_fewer_labels(monkeypatch, tmp_path):
    """wiki500k's recipe at 6,000 labels with a one-layer encoder; counted at half and a quarter of
    the labels and extrapolated, the same figures."""
    import transformers
    monkeypatch.setattr(memory, "encoder_config", lambda name: transformers.BertConfig(
        hidden_size=256, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    monkeypatch.setitem(memory.LABELS, "wiki500k", 6000)
    peaks = memory.report("wiki500k", torch.device("cpu"))
    assert list(peaks) == ["held before training", "first step", "steady step", "rewire", "step with a rewire",
                           "step after a rewire", "evaluation batch", "checkpoint save", "classifier: weights, biases",
                           "classifier: optimizer state", "classifier: indices", "classifier: slots by input, kept"]
    assert 0 < peaks["held before training"] < peaks["first step"] and peaks["step with a rewire"] >= peaks["rewire"]
    extrapolated = memory.report("wiki500k", torch.device("cpu"), label_fraction=0.5)
    for phase, peak in peaks.items():
        assert extrapolated[phase] == pytest.approx(peak, rel=0.01), phase


def test_a_grouped_classifier_with_a_dense_head_holds_what_its_shapes_say(monkeypatch):
    """`--memory --data "wiki500k --group-size 16 --dense-head 0.05"`: the classifier's tensors by
    kind, against sizes written out (6,000 labels: a head of 304, a tail of 5,696 in 356 groups)."""
    import transformers
    monkeypatch.setattr(memory, "encoder_config", lambda name: transformers.BertConfig(
        hidden_size=256, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    monkeypatch.setitem(memory.LABELS, "wiki500k", 6000)
    peaks = memory.report("wiki500k --group-size 16 --dense-head 0.05", torch.device("cpu"))
    parameters = (304 * 256 + 304 + 5696 * 128 + 5696) * 4
    assert peaks["classifier: weights, biases"] * memory.GiB == parameters
    assert peaks["classifier: optimizer state"] * memory.GiB == 2 * parameters + 4 * 4  # exp_avg, exp_avg_sq, 4 steps
    assert peaks["classifier: indices"] * memory.GiB == 356 * 128 * 4
    assert peaks["classifier: slots by input, kept"] == 0


def test_recomputing_the_encoders_activations_trains_the_same_weights(tmp_path, monkeypatch):
    """--checkpoint-activations (the paper presets): a tiny BERT with dropout inside, three steps,
    the very same bits on the CPU (the recomputation replays dropout's random state)."""
    rows = [("RED", "red apple pie"), ("BLUE", "blue sky sea"), ("RED BLUE", "red sea fruit")] * 8
    folder = tmp_path / "Tiny"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}_raw_texts.txt").write_text("".join(t + "\n" for _, t in rows))
        (folder / f"{split}_labels.txt").write_text("".join(n + "\n" for n, _ in rows))
    encoder = tiny_bert(tmp_path / "bert")
    import transformers
    bert = transformers.BertModel.from_pretrained(encoder)
    bert.config.hidden_dropout_prob = bert.config.attention_probs_dropout_prob = 0.3  # dropout inside the layers
    transformers.BertModel(bert.config).save_pretrained(encoder)
    run = Config(data=str(folder), format="raw", encoder=str(encoder), max_length=8, epochs=1, batch_size=8,
                 fan_in=4, intermediate=0, aux_weight=0.0, warmup_steps=1, device="cpu", dropout=0.0)
    weights = []
    for checkpointed in (False, True):
        out = tmp_path / f"run-{checkpointed}"
        train.run(dataclasses.replace(run, out=str(out), checkpoint_activations=checkpointed))
        weights.append(torch.load(out / "checkpoint.pt", weights_only=True)["network"])
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    import xc_files  # and the option does reach the encoder
    state = train.set_up(dataclasses.replace(run, checkpoint_activations=True), str(folder),
                         xc_files.load(str(folder), "raw"), None, torch.device("cpu"))
    transformer = state.network.encoder.transformer
    assert getattr(transformer, "is_activation_checkpointing", transformer.is_gradient_checkpointing)
    with pytest.raises(ValueError, match="needs a transformer"):
        Config(checkpoint_activations=True)


@pytest.mark.parametrize("change", [dict(optimizer_loop="for-loop"), dict(optimizer_loop="foreach"),
                                    dict(keep_slots_by_input=False), dict(keep_slots_by_input=False, loss_in_runs=True)],
                         ids=["for-loop", "foreach", "rebuilt", "in runs"])
def test_the_paper_presets_memory_options_train_the_same_bits(tiny, change, monkeypatch):
    """--optimizer-loop for-loop (no temporaries the size of a parameter group) against torch's own
    choice, the same AdamW math; --no-keep-slots-by-input, the transposed connectivity rebuilt in
    every backward pass, the same order; --loss-in-runs, the scores and the (squared hinge) loss 16
    labels at a time: the very same weights after three epochs."""
    monkeypatch.setitem(sparse_layer.GATHER_LABELS, "cpu", 16)  # 120 labels: runs of 16, chunks of 16
    monkeypatch.setattr(sparse_layer, "SORT_SLOTS", 1)
    runs = [dataclasses.replace(tiny, device="cpu", out=f"{tiny.out}-{name}", **options)
            for name, options in (("default", {}), ("changed", change))]
    weights = []
    for run in runs:
        train.run(run)
        weights.append(torch.load(f"{run.out}/checkpoint.pt", weights_only=True)["network"])
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
