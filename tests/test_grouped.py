"""HASTE's group-shared fan-in (grouped.py) against the dense float64 masked layer and brute force:
the product, its gradients, the dense start, and SET by group (dst.rewire)."""
import copy
import dataclasses
import json
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
import grouped
import model
from conftest import assert_close, build_model, dense_reference
from dst import rewire
from sparse_layer import FixedFanInLinear, fixed_fanin_linear


def by_label(indices, group_size, labels):
    """Each label's row of indices: its group's, l // G (written out here, not grouped.py's)."""
    return indices[torch.arange(labels) // group_size]


@st.composite
def grouped_problems(draw):
    batch, in_features = draw(st.integers(1, 20)), draw(st.integers(1, 30))
    group_size, labels = draw(st.integers(2, 9)), draw(st.integers(1, 60))
    fan_in = draw(st.integers(1, in_features))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    groups = -(-labels // group_size)
    # duplicates within a row are allowed by the function (they add up), as for G = 1
    indices = torch.randint(0, in_features, (groups, fan_in), generator=generator).int()
    return dict(x=torch.randn(batch, in_features, generator=generator, dtype=torch.float64),
                weight=torch.randn(labels, fan_in, generator=generator, dtype=torch.float64), indices=indices,
                bias=torch.randn(labels, generator=generator, dtype=torch.float64),
                grad_y=torch.randn(batch, labels, generator=generator, dtype=torch.float64), group_size=group_size)


@settings(max_examples=150, deadline=None)
@given(grouped_problems(), st.sampled_from([torch.float64, torch.float32]), st.integers(1, 400), st.booleans())
def test_grouped_layer_matches_the_dense_masked_layer(problem, dtype, gather, contiguous):
    """Forward, grad-x, grad-w and grad-bias of G labels a group against the dense [L, D] matrix in
    float64, in runs of any size (down to one group), the last group partial or not."""
    group_size, labels = problem["group_size"], len(problem["weight"])
    x, weight, bias = (problem[name].to(dtype).requires_grad_() for name in ("x", "weight", "bias"))
    with mock.patch.dict(grouped.GATHER_ELEMENTS, {"cpu": gather}):
        y = fixed_fanin_linear(x, weight, problem["indices"], bias, group_size=group_size, contiguous=contiguous)
        y.backward(problem["grad_y"].to(dtype))
    rows = by_label(problem["indices"], group_size, labels)
    expected = dense_reference(x.detach(), weight.detach(), rows, bias.detach(), problem["grad_y"].to(dtype))
    magnitudes = dense_reference(x.detach().abs(), weight.detach().abs(), rows, None, problem["grad_y"].abs())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert y.dtype == dtype
    assert_close(y, expected["y"], tol, magnitudes["y"] + bias.detach().abs().double())
    assert_close(x.grad, expected["grad_x"], tol, magnitudes["grad_x"])
    assert_close(weight.grad, expected["grad_weight"], tol, magnitudes["grad_weight"])
    assert_close(bias.grad, expected["grad_bias"], tol, problem["grad_y"].abs().sum(0))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(1, 40), st.integers(0, 2**31))
def test_every_label_of_a_group_reads_the_same_inputs(group_size, labels, seed):
    layer = FixedFanInLinear(24, labels, 5, group_size=group_size, generator=torch.Generator().manual_seed(seed))
    assert layer.indices.shape == (-(-labels // group_size), 5)
    connected = layer.to_dense() != 0  # (uniform weights: none is exactly zero)
    for label in range(labels):
        assert connected[label].sum() == 5  # distinct inputs in a row, as the paper's layer
        assert torch.equal(connected[label], connected[label - label % group_size])


def test_a_second_batchs_grouped_gradient_added_in_place_is_autograds_sum():
    layers = [FixedFanInLinear(12, 23, 4, group_size=4, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    layers[1].grad_in_place = True
    batches = [torch.randn(6, 12, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for layer in layers:
        for x in batches:
            layer(x).square().sum().backward()
    torch.testing.assert_close(layers[1].weight.grad, layers[0].weight.grad, rtol=1e-6, atol=1e-6)


def test_wrong_group_shapes_and_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"indices must be int32/int64 of shape \(3, 2\)"):
        fixed_fanin_linear(torch.randn(2, 5), torch.randn(9, 2), torch.zeros(9, 2, dtype=torch.int32), group_size=4)
    with pytest.raises(ValueError, match=r"indices must be int32/int64 of shape \(9, 2\) .*groups of 0"):
        fixed_fanin_linear(torch.randn(2, 5), torch.randn(9, 2), torch.zeros(9, 2, dtype=torch.int32), group_size=0)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        FixedFanInLinear(5, 9, 2, group_size=0)
    with pytest.raises(ValueError, match="needs group_size 1"):
        FixedFanInLinear(5, 9, 2, group_size=2)(torch.randn(3, 5), terms=lambda start, z: (z.sum(), z))


@given(st.integers(1, 6), st.integers(1, 30), st.integers(1, 12), st.integers(0, 2**31))
@settings(max_examples=50, deadline=None)
def test_a_grouped_dense_start_keeps_each_groups_largest_summed_magnitudes(group_size, labels, fan_in, seed):
    """from_dense with groups: each group keeps the fan_in inputs of largest sum of |w| over its
    labels (ties: the lower input), by brute force, and every label its own weights there."""
    linear = torch.nn.Linear(12, labels)
    with torch.no_grad():
        linear.weight.copy_(torch.randint(-2, 3, (labels, 12), generator=torch.Generator().manual_seed(seed)).float())
    linear.weight.requires_grad_(False)
    layer = FixedFanInLinear.from_dense(linear, fan_in, group_size=group_size)
    for group, row in enumerate(layer.indices.tolist()):
        members = range(group * group_size, min(labels, (group + 1) * group_size))
        total = [sum(abs(float(linear.weight[m, d])) for m in members) for d in range(12)]
        assert row == sorted(sorted(range(12), key=lambda d: (-total[d], d))[:fan_in])
        for m in members:
            assert layer.weight[m].tolist() == [float(linear.weight[m, d]) for d in row]


# ---------------------------------------------------------------------------------------------
# SET by group.

@st.composite
def grouped_layers(draw):
    in_features = draw(st.integers(2, 30))
    fan_in = draw(st.integers(1, in_features - 1))
    layer = FixedFanInLinear(in_features, draw(st.integers(1, 30)), fan_in, group_size=draw(st.integers(2, 6)),
                             generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
    with torch.no_grad():  # repeated magnitudes, so that ties are exercised
        if draw(st.booleans()):
            layer.weight.copy_(torch.randint(-3, 4, layer.weight.shape).float())
    return layer


def brute_force_group_scores(weight, group_size):
    """[groups][k] the mean |w| over each group's labels, written out (summed in label order and
    divided in float32, as the weights are: ties and thresholds compare the same numbers)."""
    labels, fan_in = weight.shape
    scores = []
    for g in range(0, labels, group_size):
        members = range(g, min(labels, g + group_size))
        sums = [sum((weight[m, j].abs() for m in members), torch.tensor(0.0)) for j in range(fan_in)]
        scores.append([float(total / len(members)) for total in sums])
    return scores


@settings(max_examples=100, deadline=None)
@given(grouped_layers(), st.floats(0, 1), st.integers(0, 2**31), st.sampled_from([None, 7]))
def test_grouped_global_rewire_prunes_the_smallest_mean_magnitudes_and_regrows_unused_inputs(
        layer, fraction, seed, chunk):
    layer = copy.deepcopy(layer)  # (hypothesis may call again with the same one)
    group_size, (labels, fan_in) = layer.group_size, layer.weight.shape
    before_weight, before_indices = layer.weight.detach().clone(), layer.indices.clone()
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(3, layer.in_features)).sum().backward()
    optimizer.step()
    before_weight = layer.weight.detach().clone()
    with mock.patch.dict("dst.ROW_CHUNK_ELEMENTS", {"cpu": chunk or 1 << 22}):
        stats = rewire(layer, optimizer, fraction=fraction, reset_state=True, generator=torch.Generator().manual_seed(seed))
    scores = brute_force_group_scores(before_weight, group_size)
    order = sorted((scores[g][j], g, j) for g in range(len(scores)) for j in range(fan_in))
    free = layer.in_features - fan_in
    chosen = [set() for _ in scores]
    for _, g, j in order[:int(fraction * len(scores) * fan_in)]:
        chosen[g].add(j)
    expected = [set(sorted(slots, key=lambda j: (scores[g][j], j))[:free]) for g, slots in enumerate(chosen)]
    assert stats["rewired"] == sum(map(len, expected))
    state = optimizer.state[layer.weight]
    for g, slots in enumerate(expected):
        row = layer.indices[g].tolist()
        assert len(set(row)) == fan_in and set(stats["regrown"][g].nonzero().flatten().tolist()) == slots
        for j in range(fan_in):
            if j in slots:
                assert row[j] not in before_indices[g].tolist(), "regrew an input the group uses"
            else:
                assert row[j] == int(before_indices[g, j])
            for m in range(g * group_size, min(labels, (g + 1) * group_size)):
                assert float(layer.weight.detach()[m, j]) == (0.0 if j in slots else float(before_weight[m, j]))
                if j in slots:
                    assert float(state["exp_avg"][m, j]) == 0.0 and float(state["exp_avg_sq"][m, j]) == 0.0


@settings(max_examples=50, deadline=None)
@given(grouped_layers(), st.floats(0, 2))
def test_grouped_threshold_rewire_prunes_slots_whose_mean_magnitude_is_below_it(layer, threshold):
    layer, threshold = copy.deepcopy(layer), float(torch.tensor(threshold, dtype=torch.float32))  # as rewire compares
    scores = brute_force_group_scores(layer.weight.detach(), layer.group_size)
    stats = rewire(layer, threshold=threshold)
    free = layer.in_features - layer.fan_in
    for g, row in enumerate(scores):
        below = sorted((s, j) for j, s in enumerate(row) if s < threshold)[:free]
        assert set(stats["regrown"][g].nonzero().flatten().tolist()) == {j for _, j in below}


# ---------------------------------------------------------------------------------------------
# The classifier's order of the labels, the dense head, a whole run.

@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(0, 2**31), st.data())
@settings(max_examples=60, deadline=None)
def test_label_orders_are_permutations_with_the_head_most_frequent_first(counts, seed, data):
    counts = torch.tensor(counts)
    head = data.draw(st.integers(0, len(counts) - 1))
    clusters = torch.randint(0, 4, (len(counts),), generator=torch.Generator().manual_seed(seed))
    by_frequency = sorted(range(len(counts)), key=lambda l: (-int(counts[l]), l))  # brute force
    for grouping in model.GROUPINGS:
        order = model.label_order(grouping, counts, clusters, head, seed).tolist()
        assert sorted(order) == list(range(len(counts)))
        assert order[:head] == by_frequency[:head]
        if grouping == "frequency":
            assert order == by_frequency
        if grouping == "clusters":  # by leaf, and by frequency within a leaf
            assert order[head:] == sorted(by_frequency[head:], key=lambda l: int(clusters[l]))


@pytest.mark.parametrize("group_size, head", [(4, 0), (3, 6), (1, 5)])
def test_the_model_undoes_its_label_order_in_scores_and_in_the_losses_positives(group_size, head):
    """Scores come back in the data's order of labels and the loss reads each positive at its own
    label: both against a dense float64 model built by hand from the classifier's parameters."""
    network = build_model("bow", 30, 23, dim=8, intermediate=0, fan_in=3, group_size=group_size, head=head)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    network.set_label_order(order)
    batch = data.Batch(torch.tensor([0, 0, 1]), torch.tensor([5, 17, 2]), 2, bag_ids=torch.tensor([1, 4, 9, 29]),
                       bag_offsets=torch.tensor([0, 2]), bag_values=torch.ones(4))
    network.eval()
    hidden = network.inputs(batch)[1].double()
    tail = network.sparse_classifier
    weight = torch.cat([network.classifier.head.weight.detach(), tail.to_dense()]) if head else tail.to_dense()
    bias = torch.cat([network.classifier.head.bias, tail.bias]) if head else tail.bias
    by_position = hidden @ weight.double().T + bias.detach().double()  # column p: label order[p]
    expected = torch.empty_like(by_position)
    expected[:, order] = by_position
    torch.testing.assert_close(network(batch)[0].double(), expected, rtol=1e-5, atol=1e-6)
    target = torch.full_like(expected, -1.0)
    target[batch.positive_rows, batch.positive_labels] = 1.0
    loss, _ = network(batch, loss=("squared_hinge", batch.positive_rows, batch.positive_labels))
    torch.testing.assert_close(loss.double(), (1 - target * expected).clamp(min=0).square().mean(), rtol=1e-5, atol=1e-7)


def test_a_grouped_centroid_start_keeps_each_groups_largest_mean_and_the_heads_whole_rows():
    network = build_model("bow", 10, 7, dim=6, intermediate=0, fan_in=2, group_size=2, head=2)
    order = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    network.set_label_order(order)
    hidden = torch.randn(9, 6, generator=torch.Generator().manual_seed(4))
    rows, labels = torch.arange(9), torch.tensor([0, 1, 2, 3, 4, 5, 6, 3, 0])
    network.start_from_centroids(hidden, rows, labels, scale=5.0, offset=0.5)
    length = 5.0 / hidden.double().norm(dim=1).mean()
    centroid = lambda l: (lambda m: m / m.norm() * length)(hidden.double()[rows[labels == l]].mean(0))
    for position, label in enumerate(order.tolist()[:2]):  # the head: whole rows
        torch.testing.assert_close(network.classifier.head.weight[position].double(), centroid(label))
    tail, members = network.sparse_classifier.to_dense().double(), order.tolist()[2:]
    for group in range(3):
        group_labels = members[2 * group:2 * group + 2]
        mean = sum(centroid(l).abs() for l in group_labels) / len(group_labels)
        kept = sorted(sorted(range(6), key=lambda d: (-float(mean[d]), d))[:2])
        for offset, label in enumerate(group_labels):
            expected = torch.zeros(6, dtype=torch.float64)
            expected[kept] = centroid(label)[kept]
            torch.testing.assert_close(tail[2 * group + offset], expected)


@pytest.mark.parametrize("changes", [dict(group_size=4, grouping="clusters", aux_weight=0.0),
                                     dict(group_size=3, grouping="random", dense_head=0.1),
                                     dict(group_size=1, dense_head=0.2)])
def test_a_grouped_run_trains_rewires_and_evaluates_again_from_its_checkpoint(tiny, changes):
    import evaluate
    import train
    config = dataclasses.replace(tiny, epochs=2, **changes)
    results = train.run(config)
    epochs = [json.loads(line) for line in open(f"{config.out}/log.jsonl")]
    assert epochs[-1]["loss"] < epochs[0]["loss"] and epochs[0]["rewired"] > 0
    network, xmc, batches, _ = evaluate.load_for_evaluation(f"{config.out}/checkpoint.pt", 64, "cpu")
    assert network.label_position is not None
    if changes.get("aux_weight") == 0:  # the clusters were loaded for the groups alone
        assert network.meta is None
    assert evaluate.evaluate(network, xmc, batches, "cpu") == pytest.approx(results)
    import plot  # its diagnostics read one index row per label in the data's order: refused in one line
    with pytest.raises(SystemExit, match="holds HASTE's classifier"):
        plot.main(["--checkpoint", f"{config.out}/checkpoint.pt", "--out", f"{config.out}/dst.png"])


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "0"], "--group-size must be at least 1"),
    (["--dense-head", "1"], r"--dense-head must be a fraction of the labels in \[0, 1\)"),
    (["--group-size", "4", "--no-sparse"], "--group-size and --dense-head shape the sparse classifier"),
    (["--dense-head", "0.1", "--loss-in-runs", "--no-keep-slots-by-input"], "not with --no-sparse or --loss-in-runs"),
    (["--grouping", "tree"], "--grouping must be one of frequency, clusters, random")])
def test_group_flags_are_checked_in_one_line(flags, message):
    from config import parse_config
    with pytest.raises(ValueError, match=message):
        parse_config(flags)


def test_what_the_classifier_holds_by_kind_is_its_shapes(monkeypatch):
    """tools/classifier_bytes.py on the meta device: parameters, AdamW's two moments (and a step count
    a parameter), indices, by hand."""
    import classifier_bytes
    with torch.device("meta"):
        for layer, parameters, tensors, rows in [(FixedFanInLinear(64, 1000, 8), 1000 * 9, 2, 1000),
                                                 (FixedFanInLinear(64, 1000, 8, group_size=4), 1000 * 9, 2, 250),
                                                 (model.HeadAndTail(64, 1000, 100, 8, 4, "torch"), 100 * 65 + 900 * 9,
                                                  4, 225)]:
            held = classifier_bytes.held(layer)
            assert [round(value * 2**30) for value in held] == [4 * parameters, 8 * parameters + 4 * tensors,
                                                                4 * rows * 8]
