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


def brute_force_global(weight, fraction):
    """Per row, the slots among the floor(fraction * L * k) smallest |w| of the whole matrix, ties
    broken in row-major order (plain sorting of (|w|, row, slot))."""
    rows, fan_in = weight.shape
    order = sorted((abs(float(weight[r, j])), r, j) for r in range(rows) for j in range(fan_in))
    chosen = [set() for _ in range(rows)]
    for _, r, j in order[:int(fraction * rows * fan_in)]:
        chosen[r].add(j)
    return chosen


def check_rewired(layer, before_weight, before_indices, stats, expected):
    """Invariants, and: exactly the expected slots pruned, regrown at unused inputs with weight 0."""
    check_row_invariants(layer)
    weight = layer.weight.detach()
    assert stats["rewired"] == sum(len(slots) for slots in expected)
    for row in range(layer.out_features):
        pruned = set(stats["regrown"][row].nonzero().flatten().tolist())
        assert pruned == expected[row]
        for slot in range(layer.fan_in):
            if slot in pruned:
                assert float(weight[row, slot]) == 0.0
                assert int(layer.indices[row, slot]) not in before_indices[row].tolist(), "regrew a used input"
            else:
                assert float(weight[row, slot]) == float(before_weight[row, slot])
                assert int(layer.indices[row, slot]) == int(before_indices[row, slot])


@settings(max_examples=100, deadline=None)
@given(layers(), st.floats(0, 1), st.sampled_from(["global", "row"]), st.sampled_from([0.0, 0.3]),
       st.integers(0, 2**31), st.sampled_from([None, 7, 40]))
def test_fraction_mode_prunes_the_smallest_and_regrows_unused_at_zero(layer, fraction, scope, row_cap, seed, chunk):
    """scope "global": the smallest |w| of the whole matrix (the release); "row": of every row.
    Then at most row_cap of a row, and never more than the row's free inputs."""
    before_weight, before_indices = layer.weight.detach().clone(), layer.indices.clone()
    k, free = layer.fan_in, layer.in_features - layer.fan_in
    with mock.patch.dict(dst.ROW_CHUNK_ELEMENTS, {"cpu": chunk or dst.ROW_CHUNK_ELEMENTS["cpu"]}):
        stats = rewire(layer, fraction=fraction, scope=scope, row_cap=row_cap,
                       generator=torch.Generator().manual_seed(seed))
    chosen = (brute_force_global(before_weight, fraction) if scope == "global"
              else [range(int(fraction * k))] * len(before_weight))
    cap = min(int(row_cap * k) if row_cap else k, free)
    expected = [brute_force_pruned(row, min(len(slots), cap)) for row, slots in zip(before_weight, chosen)]
    check_rewired(layer, before_weight, before_indices, stats, expected)


@settings(max_examples=100, deadline=None)
@given(layers(), st.floats(0, 3), st.sampled_from([0.0, 0.25, 1.0]))
def test_threshold_mode_prunes_below_the_threshold_with_and_without_a_cap(layer, threshold, row_cap):
    before_weight, before_indices = layer.weight.detach().clone(), layer.indices.clone()
    stats = rewire(layer, threshold=threshold, row_cap=row_cap)
    cap = min(int(row_cap * layer.fan_in) if row_cap else layer.fan_in, layer.in_features - layer.fan_in)
    expected = [brute_force_pruned(row, min(int((row.abs() < threshold).sum()), cap)) for row in before_weight]
    check_rewired(layer, before_weight, before_indices, stats, expected)


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
    lambda p: torch.optim.Adam(p, lr=0.1),
    lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.SGD(p, lr=0.1),  # no momentum: no state to keep or reset
    lambda p: torch.optim.Adagrad(p, lr=0.1),
])
def test_optimizer_state_is_reset_at_regrown_slots_only(make_optimizer):
    layer = FixedFanInLinear(50, 20, 10)
    optimizer = make_optimizer(layer.parameters())
    layer(torch.randn(8, 50)).square().sum().backward()
    optimizer.step()
    state = {name: value.clone() for name, value in optimizer.state[layer.weight].items() if torch.is_tensor(value)}
    bias_state = {name: value.clone() for name, value in optimizer.state[layer.bias].items() if torch.is_tensor(value)}
    rewire(layer, optimizer, fraction=0.3)  # the release keeps the state of regrown slots
    for name, value in optimizer.state[layer.weight].items():
        assert not torch.is_tensor(value) or torch.equal(value, state[name]), name
    stats = rewire(layer, optimizer, fraction=0.3, scope="row", reset_state=True)
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


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=70), st.integers(1, 7))
def test_regrown_slots_wait_for_the_next_rewire_as_bits(values, width):
    """dst.packed: bit j of byte i is slot 8 i + j (brute force), and unpacked gives the mask back;
    a bool mask (an older checkpoint's) and None pass through unpacked as they are."""
    mask = torch.tensor(values + [False] * (-len(values) % width), dtype=torch.bool).view(-1, width)
    bits = dst.packed(mask)
    flat = mask.flatten().tolist()
    assert bits.tolist() == [sum(1 << j for j in range(8) if 8 * i + j < len(flat) and flat[8 * i + j])
                             for i in range((len(flat) + 7) // 8)]
    assert torch.equal(dst.unpacked(bits, mask.shape), mask)
    assert dst.unpacked(mask, mask.shape) is mask and dst.unpacked(None, mask.shape) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 0.5, -0.5, 1e-45, -1e-45, 3.0, float("inf"), float("-inf")])
                | st.floats(allow_nan=False, width=32), min_size=1, max_size=60), st.data())
def test_the_kth_smallest_by_bisection_on_the_bits_is_the_sorts(values, data):
    """The global cut (prune_counts): dst.kth_smallest against a sort, with ties, signed zeros,
    subnormals and infinities, in chunks of 7 (float32), and float64 through kthvalue."""
    k = data.draw(st.integers(1, len(values)))
    with mock.patch.dict(dst.ROW_CHUNK_ELEMENTS, cpu=7):
        for dtype in (torch.float32, torch.float64):
            tensor = torch.tensor(values, dtype=dtype).view(-1, 1 + (len(values) % 2 == 0))
            assert dst.kth_smallest(tensor, k) == tensor.flatten().sort().values[k - 1]


def test_a_full_layer_has_nothing_to_regrow_into():
    layer = FixedFanInLinear(6, 4, 6)
    assert rewire(layer, fraction=0.5)["rewired"] == 0


@pytest.mark.parametrize("kwargs", [dict(), dict(fraction=0.1, threshold=0.1), dict(fraction=1.5),
                                    dict(threshold=0.1, row_cap=2), dict(fraction=0.1, scope="column")])
def test_rewire_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        rewire(FixedFanInLinear(6, 4, 2), **kwargs)


# The release's rewiring amounts: a constant fraction 0.2 (threshold mode off), a threshold floor of 1e-4.
RELEASE_FRACTION = dict(fraction=0.2, threshold=0.0, fraction_schedule="constant", threshold_floor=1e-4)


def test_schedule_counts_batches_until_last_batch_with_cosine_decays():
    schedule = RewireSchedule(**RELEASE_FRACTION, last_batch=6600, interval=800)
    due = [batch for batch in range(10_001) if schedule.due(batch)]
    assert due == list(range(800, 6601, 800))  # never at batch 0, never after last_batch
    assert schedule.amount(0) == schedule.amount(6000) == (0.2, None)  # the release: constant
    cosine = RewireSchedule(**{**RELEASE_FRACTION, "fraction_schedule": "cosine"}, last_batch=6600, interval=800)
    assert cosine.amount(0)[0] == 0.2 and cosine.amount(3300)[0] == pytest.approx(0.1)
    values = [cosine.cosine(batch) for batch in range(0, 6601, 100)]
    assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(0)
    threshold = RewireSchedule(**{**RELEASE_FRACTION, "threshold": 0.01}, last_batch=100, interval=10)  # the release: to 1e-4
    assert threshold.amount(0) == (None, 0.01)
    assert threshold.amount(50)[1] == pytest.approx(1e-4 + (0.01 - 1e-4) / 2)
    assert threshold.amount(100)[1] == pytest.approx(1e-4)
    assert RewireSchedule(**{**RELEASE_FRACTION, "threshold": 0.01, "threshold_floor": 0}, last_batch=100, interval=10).amount(100)[1] \
        == pytest.approx(0)


def test_with_gradient_accumulation_the_step_closing_the_window_rewires():
    """Interval 1500 batches, windows of 2 (Amazon-3M) or 8: the release counts batches, and the
    rewire follows the optimizer step of the window that holds batch 1500, 3000, ..."""
    schedule = RewireSchedule(**RELEASE_FRACTION, last_batch=10_000, interval=1500)
    assert [b for b in range(2, 10_001, 2) if schedule.due(b, window=2)] == list(range(1500, 10_001, 1500))
    assert [b for b in range(8, 10_001, 8) if schedule.due(b, window=8)] == [1504, 3000, 4504, 6000, 7504, 9000]


@pytest.mark.parametrize("kwargs", [dict(interval=0), dict(last_batch=-1), dict(fraction_schedule="linear")])
def test_schedule_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        RewireSchedule(**{**RELEASE_FRACTION, "last_batch": 100, "interval": 800, **kwargs})


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.AdamW(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1), lambda p: torch.optim.Adagrad(p, lr=0.1),
])
def test_training_goes_on_after_a_rewire_and_regrown_slots_start_from_zero(make_optimizer):
    """After a rewire the optimizer steps the new connections: a regrown weight is 0 until the next
    step, then it moves, for every optimizer (SGD without state too)."""
    torch.manual_seed(0)
    layer = FixedFanInLinear(30, 12, 6)
    optimizer = make_optimizer(layer.parameters())
    for reset_state in (False, True):
        layer(torch.randn(8, 30)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        regrown = rewire(layer, optimizer, fraction=0.5, scope="row", reset_state=reset_state)["regrown"]
        assert bool((layer.weight[regrown] == 0).all())
        layer(torch.randn(8, 30)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert bool((layer.weight[regrown] != 0).all())


def test_an_optimizer_rewire_cannot_serve_is_a_one_line_error():
    layer, other = FixedFanInLinear(30, 12, 6), FixedFanInLinear(30, 12, 6)
    with pytest.raises(ValueError, match=r"^rewire: the AdamW given does not optimize the layer's weight"):
        rewire(layer, torch.optim.AdamW(other.parameters()), fraction=0.2)
    factored = torch.optim.Adafactor(layer.parameters(), lr=0.01)  # row and column statistics, not per weight
    layer(torch.randn(8, 30)).square().sum().backward()
    factored.step()
    with pytest.raises(ValueError, match=r"^rewire: Adafactor keeps state .* not one value per weight"):
        rewire(layer, factored, fraction=0.2, reset_state=True)
    assert rewire(layer, factored, fraction=0.2)["rewired"] > 0  # keeping its state is fine
