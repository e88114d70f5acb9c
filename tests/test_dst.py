"""SET rewiring against brute force: which slots are pruned, what is regrown, what is reset."""
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dst
from dst import RewireSchedule, rewire
from sparse_layer import FixedFanInLinear


@st.composite
def layers(draw):
    in_features = draw(st.integers(1, 40))
    fan_in = draw(st.integers(1, in_features))
    layer = FixedFanInLinear(in_features, draw(st.integers(1, 30)), fan_in,
                             generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
    with torch.no_grad():  # repeated magnitudes and zeros, so that ties are exercised
        if draw(st.booleans()):
            layer.weight.copy_(torch.randint(-3, 4, layer.weight.shape).float())
    return layer


def brute_force_pruned(weight_row, count):
    """The `count` slots of smallest |w|, ties broken by slot position."""
    order = sorted(range(len(weight_row)), key=lambda j: (abs(float(weight_row[j])), j))
    return set(order[:count])


def check_row_invariants(layer):
    indices = layer.indices
    assert indices.dtype == torch.int32
    assert int(indices.min()) >= 0 and int(indices.max()) < layer.in_features
    assert bool((indices.sort(dim=1).values.diff(dim=1) > 0).all()), "a row repeats an index"


@settings(max_examples=100, deadline=None)
@given(layers(), st.floats(0, 1), st.integers(0, 2**31), st.sampled_from([None, 7, 40]))
def test_fraction_mode_prunes_the_smallest_and_regrows_unused_at_zero(layer, fraction, seed, chunk):
    before_weight, before_indices = layer.weight.detach().clone(), layer.indices.clone()
    weight = layer.weight.detach()
    k, free = layer.fan_in, layer.in_features - layer.fan_in
    with mock.patch.dict(dst.ROW_CHUNK_ELEMENTS, {"cpu": chunk or dst.ROW_CHUNK_ELEMENTS["cpu"]}):
        stats = rewire(layer, fraction=fraction, generator=torch.Generator().manual_seed(seed))

    check_row_invariants(layer)
    count = min(int(fraction * k), free)
    assert stats["rewired"] == count * layer.out_features
    for row in range(layer.out_features):
        pruned = set(stats["regrown"][row].nonzero().flatten().tolist())
        assert pruned == brute_force_pruned(before_weight[row], count)
        for slot in range(k):
            if slot in pruned:
                assert float(weight[row, slot]) == 0.0
                assert int(layer.indices[row, slot]) not in before_indices[row].tolist(), "regrew a used input"
            else:
                assert float(weight[row, slot]) == float(before_weight[row, slot])
                assert int(layer.indices[row, slot]) == int(before_indices[row, slot])


@settings(max_examples=100, deadline=None)
@given(layers(), st.floats(0, 3), st.floats(0, 1))
def test_threshold_mode_prunes_below_threshold_up_to_the_cap(layer, threshold, max_fraction):
    before_weight = layer.weight.detach().clone()
    stats = rewire(layer, threshold=threshold, max_fraction=max_fraction)
    check_row_invariants(layer)
    cap = min(int(max_fraction * layer.fan_in), layer.in_features - layer.fan_in)
    for row in range(layer.out_features):
        below = int((before_weight[row].abs() < threshold).sum())
        pruned = set(stats["regrown"][row].nonzero().flatten().tolist())
        assert pruned == brute_force_pruned(before_weight[row], min(below, cap))


@settings(max_examples=60, deadline=None)
@given(layers(), st.floats(0, 1))
def test_rewire_changes_the_function_only_by_removing_pruned_weights(layer, fraction):
    x = torch.randn(5, layer.in_features)
    before = layer.weight.detach().clone(), layer.indices.clone()
    stats = rewire(layer, fraction=fraction)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, torch.zeros(layer.out_features, layer.in_features).scatter_add_(
            1, before[1].long(), before[0] * ~stats["regrown"]), layer.bias)
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.AdamW(p, lr=0.1),
    lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
])
def test_optimizer_state_is_reset_at_regrown_slots_only(make_optimizer):
    layer = FixedFanInLinear(50, 20, 10)
    optimizer = make_optimizer(layer.parameters())
    layer(torch.randn(8, 50)).square().sum().backward()
    optimizer.step()
    state = {name: value.clone() for name, value in optimizer.state[layer.weight].items() if torch.is_tensor(value)}
    bias_state = {name: value.clone() for name, value in optimizer.state[layer.bias].items() if torch.is_tensor(value)}
    stats = rewire(layer, optimizer, fraction=0.3)
    regrown = stats["regrown"]
    assert stats["rewired"] == 20 * 3
    for name, value in optimizer.state[layer.weight].items():
        if torch.is_tensor(value) and value.shape == layer.weight.shape:
            assert bool((value[regrown] == 0).all()), name
            assert torch.equal(value[~regrown], state[name][~regrown]), name
        elif torch.is_tensor(value):
            assert torch.equal(value, state[name]), f"{name} (a scalar) must stay"
    for name, value in bias_state.items():
        assert torch.equal(optimizer.state[layer.bias][name], value), f"bias {name} must not be touched"


def test_regrowth_is_uniform_over_unused_inputs():
    """k = 5 of D = 10 used, one slot regrown per row: each of the 5 unused inputs ~ 1/5 of the time."""
    layer = FixedFanInLinear(10, 20000, 5)
    with torch.no_grad():
        layer.indices.copy_(torch.arange(5, dtype=torch.int32).expand(20000, 5))
    stats = rewire(layer, fraction=0.2, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(layer.indices[stats["regrown"]].long(), minlength=10)
    assert counts[:5].sum() == 0
    assert float((counts[5:] - 4000).abs().max()) < 300  # ~5 standard deviations


def test_survival_statistic():
    layer = FixedFanInLinear(30, 10, 10)
    first = rewire(layer, fraction=0.2)
    assert first["survived"] is None
    with torch.no_grad():  # regrown weights grow large: none of them is pruned next time
        layer.weight[first["regrown"]] = 100.0
    assert rewire(layer, fraction=0.2, previous_regrown=first["regrown"])["survived"] == 1.0


def test_a_full_layer_has_nothing_to_regrow_into():
    layer = FixedFanInLinear(6, 4, 6)
    assert rewire(layer, fraction=0.5)["rewired"] == 0


@pytest.mark.parametrize("kwargs", [dict(), dict(fraction=0.1, threshold=0.1), dict(fraction=1.5),
                                    dict(threshold=0.1), dict(threshold=0.1, max_fraction=2)])
def test_rewire_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        rewire(FixedFanInLinear(6, 4, 2), **kwargs)


def test_schedule_boundaries_and_cosine_decay():
    schedule = RewireSchedule(total_steps=10_000, interval=800, end=0.66, fraction=0.2)
    due = [step for step in range(10_001) if schedule.due(step)]
    assert due == list(range(800, 6600, 800))  # never at step 0, never at or after 0.66 of training
    assert schedule.decay(0) == 1.0 and schedule.decay(6600) == 0.0 and schedule.decay(9999) == 0.0
    assert schedule.decay(3300) == pytest.approx(0.5)
    values = [schedule.decay(step) for step in range(0, 6600, 100)]
    assert values == sorted(values, reverse=True)
    assert schedule.arguments(0) == {"fraction": 0.2}
    threshold = RewireSchedule(total_steps=100, interval=10, threshold=0.01, fraction=0.3)
    assert threshold.arguments(0) == {"threshold": 0.01, "max_fraction": 0.3}
    assert threshold.arguments(33)["threshold"] == pytest.approx(0.005)


@pytest.mark.parametrize("kwargs", [dict(interval=0), dict(end=1.5), dict(total_steps=-1)])
def test_schedule_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        RewireSchedule(**{"total_steps": 100, **kwargs})
