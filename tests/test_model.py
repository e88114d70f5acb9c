"""model.py against dense float64 definitions: the chunked losses (values and gradients, in both
layouts and in 16 bit) and the meta loss; a fan-in wider than the classifier's inputs refused."""
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import model
import sparse_layer
from conftest import build_model


def dense_labels(scores, rows, labels):
    y = torch.zeros_like(scores)
    y[rows, labels] = 1
    return y


DENSE_LOSSES = {  # float64, from a dense 0/1 label matrix: the definitions the chunked losses must match
    "squared_hinge": lambda s, y: torch.relu(1 - (2 * y - 1) * s).square().mean(),
    "bce": lambda s, y: torch.nn.functional.binary_cross_entropy_with_logits(s, y, reduction="sum"),
    "bce_mean": lambda s, y: torch.nn.functional.binary_cross_entropy_with_logits(s, y),
}


@pytest.mark.parametrize("name", list(DENSE_LOSSES))
@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])  # elements per label chunk: one label a chunk, uneven, all
@pytest.mark.parametrize("dtype, transposed", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_chunked_losses_match_dense_definitions_in_value_and_gradient(monkeypatch, name, chunk, dtype, transposed):
    monkeypatch.setitem(model.LOSS_CHUNK_ELEMENTS, "cpu", chunk)
    generator = torch.Generator().manual_seed(1)
    scores = (torch.randn(13, 6, generator=generator) * 2).to(dtype).T if transposed else \
        (torch.randn(6, 13, generator=generator) * 2).to(dtype)  # transposed: a [B, L] view of [L, B], as the layer gives
    rows, labels = torch.tensor([0, 0, 2, 5, 5]), torch.tensor([1, 4, 12, 0, 3])
    scores = scores.detach().requires_grad_()
    loss = model.LOSSES[name](scores, rows, labels)
    loss.backward()
    s64 = scores.detach().double().requires_grad_()
    expected = DENSE_LOSSES[name](s64, dense_labels(s64, rows, labels))
    expected.backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(scores.grad.double(), s64.grad, rtol=tolerance, atol=tolerance * float(s64.grad.abs().max()))
    assert scores.grad.stride() == scores.stride()  # no transposing copy for the layer's backward


@pytest.mark.parametrize("name", list(DENSE_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_loss_that_overwrites_its_scores_gives_the_same_bits(monkeypatch, name, dtype):
    """overwrite=True (train.py): the slope written over the scores, chunk by chunk (7 elements), the
    very same loss and gradient as into a buffer of its own; the scores' storage is that gradient."""
    monkeypatch.setitem(model.LOSS_CHUNK_ELEMENTS, "cpu", 7)
    scores = (torch.randn(13, 6, generator=torch.Generator().manual_seed(1)) * 2).to(dtype).requires_grad_()
    rows, labels = torch.tensor([0, 0, 2, 5, 5]), torch.tensor([1, 4, 12, 0, 3])
    results = []
    for overwrite in (False, True):
        layer_output = scores.T * 1  # a [B, L] view of an [L, B] non-leaf, as the layer gives
        loss = model.LOSSES[name](layer_output, rows, labels, overwrite=overwrite)
        gradient, = torch.autograd.grad(loss, layer_output)
        results.append((loss, gradient, layer_output.detach()))
    (loss, gradient, untouched), (loss_overwriting, gradient_overwriting, overwritten) = results
    assert torch.equal(loss_overwriting, loss) and torch.equal(gradient_overwriting, gradient)
    assert torch.equal(untouched, scores.T.detach()) and overwritten.data_ptr() == gradient_overwriting.data_ptr()


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(list(DENSE_LOSSES)), st.sampled_from([torch.float32, torch.bfloat16]), st.integers(1, 30),
       st.integers(2, 9), st.integers(1, 5), st.integers(1, 40), st.booleans(), st.integers(0, 2**31))
def test_a_loss_in_runs_gives_the_scores_loss_and_the_same_gradient_bits(name, dtype, labels, batch, chunk, slots,
                                                                         accumulate, seed):
    """label_loss_in_runs (--loss-in-runs): the classifier's scores and loss a run of labels at a
    time (runs of `chunk`-label chunks, `slots` slots a sort), the [B, L] scores never whole: the
    gradients of x, weight and bias are those of LOSSES[name](layer(x)) (a second batch's added into
    .grad in place too), the same bits for the squared hinge, and the loss that of the dense float64
    definition. (A batch of one gives the plain path's [L, 1] gradient other strides, which send
    embedding_bag down another path.)"""
    generator = torch.Generator().manual_seed(seed)
    in_features, fan_in = 7, 3
    layers = [sparse_layer.FixedFanInLinear(in_features, labels, fan_in, generator=generator) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    with torch.no_grad():
        layers[0].bias.normal_(generator=generator)
        layers[1].bias.copy_(layers[0].bias)
    for layer in layers:
        layer.grad_in_place = accumulate
    x = torch.randn(batch, in_features, generator=generator).to(dtype)
    positives = torch.rand(batch, labels, generator=generator) < 0.3
    rows, positive_labels = positives.nonzero(as_tuple=True)
    shuffled = torch.randperm(len(rows), generator=generator)  # any order of the positives
    rows, positive_labels = rows[shuffled], positive_labels[shuffled]
    results = []
    with mock.patch.dict(sparse_layer.GATHER_LABELS, cpu=chunk), mock.patch.object(sparse_layer, "SORT_SLOTS", slots):
        for layer, in_runs in zip(layers, (False, True)):
            inputs = x.clone().requires_grad_()
            for _ in range(1 + accumulate):
                loss = (model.label_loss_in_runs(layer, inputs, name, rows, positive_labels) if in_runs else
                        model.LOSSES[name](layer(inputs), rows, positive_labels, overwrite=True))
                loss.backward()
            results.append((loss, inputs.grad, layer.weight.grad, layer.bias.grad))
    for what, plain, in_runs in zip(("x", "weight", "bias"), results[0][1:], results[1][1:]):
        if name == "squared_hinge":
            assert torch.equal(plain, in_runs), what
        else:  # sigmoid rounds by the ulp in a CPU vector loop's scalar tail, which sits elsewhere in a run
            torch.testing.assert_close(plain, in_runs, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
    dense = layers[0].to_dense().double()
    s64 = (x.double() @ dense.T.to(dtype).double() + layers[0].bias.to(dtype).double())
    expected = DENSE_LOSSES[name](s64, positives.double())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(results[1][0].double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("sparse", [True, False])
def test_a_classifier_started_from_centroids_points_each_label_at_its_documents_mean(sparse):
    """--classifier-init centroids against a float64 brute force: label l's weights are the mean of
    its documents' inputs, normalised to scale / the mean input norm; a sparse classifier keeps the
    fan_in coordinates of largest |w|, and a label without documents zero weights; every bias
    -scale * offset."""
    generator = torch.Generator().manual_seed(4)
    network = build_model("bow", 10, 5, dim=6, intermediate=0, fan_in=3, sparse=sparse)
    hidden = torch.randn(9, 6, generator=generator)
    rows, labels = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 8]), torch.tensor([0, 2, 0, 1, 1, 2, 3, 3, 1])  # label 4: none
    network.start_from_centroids(hidden, rows, labels, scale=7.0, offset=0.25)
    length = 7.0 / hidden.double().norm(dim=1).mean()
    for label in range(5):
        members = hidden.double()[rows[labels == label]]
        expected = torch.zeros(6, dtype=torch.float64) if len(members) == 0 else \
            members.mean(0) / members.mean(0).norm() * length
        if sparse:  # the fan_in largest |w|, lower input first among equals
            kept = sorted(range(6), key=lambda d: (-abs(float(expected[d])), d))[:3]
            expected = torch.zeros(6, dtype=torch.float64).index_copy_(0, torch.tensor(kept), expected[kept])
        got = network.classifier.to_dense()[label] if sparse else network.classifier.weight[label]
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert bool((network.classifier.bias == -7.0 * 0.25).all())


def test_chunked_loss_refuses_a_second_backward():
    scores = torch.randn(2, 3, requires_grad=True)
    loss = model.squared_hinge(scores, torch.tensor([0]), torch.tensor([1]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def test_losses_match_their_dense_definitions():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 9, generator=generator) * 2
    rows, labels = torch.tensor([0, 0, 2, 5]), torch.tensor([1, 4, 8, 0])
    y = dense_labels(scores, rows, labels)
    signs = 2 * y - 1
    torch.testing.assert_close(model.squared_hinge(scores, rows, labels), torch.relu(1 - signs * scores).square().mean())
    torch.testing.assert_close(model.bce(scores, rows, labels),  # the release's: a sum
                               torch.nn.functional.binary_cross_entropy_with_logits(scores, y, reduction="sum"))
    torch.testing.assert_close(model.bce_mean(scores, rows, labels),
                               torch.nn.functional.binary_cross_entropy_with_logits(scores, y))
    clusters = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    meta = torch.randn(6, 4, generator=generator)
    expected_targets = torch.zeros(6, 4)
    expected_targets[0, 0] = expected_targets[0, 2] = expected_targets[2, 3] = expected_targets[5, 0] = 1
    torch.testing.assert_close(model.meta_loss(meta, rows, labels, clusters),
                               torch.nn.functional.binary_cross_entropy_with_logits(meta, expected_targets))


def test_a_fan_in_wider_than_the_classifiers_inputs_is_refused_not_clamped():
    with pytest.raises(ValueError, match=r"^--fan-in 512 is larger than the classifier's 256 inputs"):
        build_model("bow", 50, 20, dim=256, intermediate=0, fan_in=512)
    assert build_model("bow", 50, 20, dim=256, intermediate=0, fan_in=256).classifier.fan_in == 256
    assert build_model("bow", 50, 20, dim=256, intermediate=0, fan_in=512, sparse=False) is not None


def targets_of(dense):
    """The same 0/1 target in every form positives_of takes (scipy's only where it is installed)."""
    forms = {"dense": dense, "torch COO": dense.to_sparse(), "torch CSR": dense.to_sparse_csr(),
             "uncoalesced COO": torch.sparse_coo_tensor(  # a positive listed twice, as 1 + 0
                 torch.cat([dense.nonzero().T, dense.nonzero()[:1].T], 1),
                 torch.cat([torch.ones(int(dense.sum())), torch.tensor([0.0])]), dense.shape, check_invariants=True)}
    try:
        import scipy.sparse
        forms["scipy CSR"] = scipy.sparse.csr_matrix(dense.numpy())
    except ImportError:
        pass
    return forms


@pytest.mark.parametrize("name", list(DENSE_LOSSES))
@pytest.mark.parametrize("transposed", [False, True])
def test_public_losses_take_any_target_form_and_match_dense_definitions(name, transposed):
    """A forker's use: scores from any model, a 0/1 target as they have it; value and gradient
    against the float64 dense definition, in both layouts."""
    generator = torch.Generator().manual_seed(3)
    dense = (torch.rand(7, 11, generator=generator) < 0.2).float()
    dense[0, 0] = 1
    base = torch.randn(11, 7, generator=generator).T if transposed else torch.randn(7, 11, generator=generator)
    s64 = base.double().requires_grad_()
    expected = DENSE_LOSSES[name](s64, dense.double())
    expected.backward()
    for form, target in targets_of(dense).items():
        scores = base.clone().requires_grad_() if not transposed else base.T.clone().T.requires_grad_()
        loss = model.LOSSES[name](scores, *model.positives_of(target))
        loss.backward()
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5, msg=form)
        torch.testing.assert_close(scores.grad.double(), s64.grad, rtol=1e-5, atol=1e-6, msg=form)


def test_a_target_that_is_not_0_1_is_refused():
    with pytest.raises(ValueError, match="0 and 1 only"):
        model.positives_of(torch.tensor([[0.0, 0.5]]))
    with pytest.raises(ValueError, match="0 and 1 only"):
        model.positives_of(torch.tensor([[0.0, 2.0]]).to_sparse())
