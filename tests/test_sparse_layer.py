"""The torch backend (and, on a GPU, the cuda backend) against the dense masked reference."""
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparse_layer
from conftest import assert_close, dense_reference
from sparse_layer import FixedFanInLinear, fixed_fanin_linear

GPU = torch.cuda.is_available() and sparse_layer.cupy_available()
# Tolerance per dtype, relative to the sum of |terms|: fp32 accumulation, one rounding of the output.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@st.composite
def problems(draw, max_size=48):
    """A random fixed fan-in problem; rows may hold duplicate indices (the function allows them)."""
    batch = draw(st.integers(1, max_size))
    in_features = draw(st.integers(1, max_size))
    labels = draw(st.integers(1, max_size))
    fan_in = draw(st.sampled_from([1, in_features, draw(st.integers(1, in_features))]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if draw(st.booleans()):
        indices = torch.randint(0, in_features, (labels, fan_in), generator=generator)
    else:
        indices = sparse_layer.random_distinct_indices(labels, in_features, fan_in, generator)
    return {
        "x": torch.randn(batch, in_features, generator=generator),
        "weight": torch.randn(labels, fan_in, generator=generator),
        "indices": indices.int(),
        "bias": torch.randn(labels, generator=generator) if draw(st.booleans()) else None,
        "grad_y": torch.randn(batch, labels, generator=generator)
        * (torch.rand(batch, labels, generator=generator) < 0.7),  # zeros, as squared hinge gives
    }


def check_against_reference(problem, backend, dtype, device="cpu", needs=("x", "weight")):
    """Run forward + backward through fixed_fanin_linear and compare all four results (of x's and
    weight's gradients, those in `needs`; the others are not asked for)."""
    # Round the inputs to `dtype` first, so the reference sees exactly what the backend sees.
    x, weight = problem["x"].to(dtype), problem["weight"].to(dtype)
    bias, grad_y = problem["bias"], problem["grad_y"].to(dtype)
    expected = dense_reference(x, weight, problem["indices"], None if bias is None else bias.to(dtype), grad_y)
    magnitudes = dense_reference(x.abs(), weight.abs(), problem["indices"], None, grad_y.abs())

    on_device = lambda t, grad=True: None if t is None else t.to(device).detach().requires_grad_(grad)
    x_, w_ = on_device(x, "x" in needs), on_device(weight, "weight" in needs)
    b_ = on_device(None if bias is None else bias.to(dtype))
    y = fixed_fanin_linear(x_, w_, problem["indices"].to(device), b_, backend=backend)
    y.backward(grad_y.to(device))

    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == expected["y"].shape
    assert_close(y, expected["y"], tol, magnitudes["y"] + (0 if bias is None else bias.abs().double()))
    for name, tensor in (("x", x_), ("weight", w_)):
        if name in needs:
            assert_close(tensor.grad, expected[f"grad_{name}"], tol, magnitudes[f"grad_{name}"])
    if bias is not None:
        assert_close(b_.grad, expected["grad_bias"], tol, magnitudes["grad_bias"])


@settings(max_examples=150, deadline=None)
@given(problems())
def test_torch_backend_matches_dense_reference(problem):
    check_against_reference(problem, "torch", torch.float32)


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(1, 50))
def test_torch_backend_is_chunk_invariant(problem, chunk):
    """Small gather chunks split the labels of grad-x into many chunks (and chunks of one label)."""
    with mock.patch.dict(sparse_layer.GATHER_LABELS, {"cpu": chunk}):
        check_against_reference(problem, "torch", torch.float32)


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(1, 9), st.integers(1, 200), st.sampled_from([torch.float32, torch.bfloat16]))
def test_grad_x_a_run_of_labels_at_a_time_is_the_same_bits(problem, chunk, sort_slots, dtype):
    """No kept transposed connectivity (the paper presets): grad-x built and read a run of whole
    chunks at a time, the very bits of the kept copy read whole (the chunks summed in one order)."""
    x = problem["x"].to(dtype)
    weight, indices, grad_y = problem["weight"].to(dtype), problem["indices"], problem["grad_y"].to(dtype)
    results = []
    with mock.patch.dict(sparse_layer.GATHER_LABELS, {"cpu": chunk}), \
            mock.patch.object(sparse_layer, "SORT_SLOTS", sort_slots):
        for cache in ({}, None):  # kept (built whole), or built a run at a time
            x_ = x.clone().requires_grad_()
            fixed_fanin_linear(x_, weight, indices, cache=cache).backward(grad_y)
            results.append(x_.grad)
        check_against_reference(problem, "torch", dtype)
    assert torch.equal(results[0], results[1])


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(1, 2000))
def test_torch_backend_gpu_weight_gradient_on_the_cpu(problem, chunk):
    """The torch backend's GPU path for grad-w (gathered inputs, chunked) runs here too, so CI checks it."""
    with mock.patch.object(sparse_layer.TorchOps, "grad_weight", sparse_layer.TorchOps.grad_weight_gathered), \
            mock.patch.dict(sparse_layer.CHUNK_ELEMENTS, {"cpu": chunk}):
        check_against_reference(problem, "torch", torch.float32)


@settings(max_examples=60, deadline=None)
@given(problems(), problems(), st.sampled_from([torch.float32, torch.bfloat16]), st.integers(1, 40))
def test_a_second_batchs_weight_gradient_added_in_place_is_autograds_sum(first, second, dtype, block):
    """grad_in_place (gradient accumulation without a second [L, k]): two batches' weight gradients,
    the second added into .grad a block of slots at a time, are the bits autograd's accumulation
    gives, and the dense float64 sum of the two within the tolerance."""
    labels, fan_in = first["weight"].shape
    in_features, grad_weight = first["x"].shape[1], sparse_layer.TorchOps.grad_weight
    layers = [FixedFanInLinear(in_features, labels, fan_in) for _ in range(2)]
    for layer in layers:
        layer.load_state_dict({"weight": first["weight"], "bias": torch.zeros(labels), "indices": first["indices"]})
    layers[1].grad_in_place = True
    batches = [first["x"], second["x"][:, :1].expand(-1, in_features) * 0.5]  # any second batch of width D
    computed = []  # the rows of every grad-w computed
    spy = lambda grad_yT, xT, indices: computed.append(len(indices)) or grad_weight(grad_yT, xT, indices)
    with mock.patch.object(sparse_layer, "ACCUMULATE_ELEMENTS", block), \
            mock.patch.object(sparse_layer.TorchOps, "grad_weight", spy):
        for layer in layers:
            for x in batches:
                layer(x.to(dtype)).float().square().sum().backward()
    assert computed[:3] == [labels] * 3 and max(computed[3:]) == min(labels, max(1, block // fan_in))  # then blocks
    assert torch.equal(layers[1].weight.grad, layers[0].weight.grad)
    assert torch.equal(layers[1].bias.grad, layers[0].bias.grad)
    expected, magnitudes = 0, 0
    for x in (x.to(dtype) for x in batches):  # d(sum y^2)/dy = 2y, in float64 from the same rounded inputs
        grad_y, weight = 2 * layers[0](x).double().detach(), first["weight"].to(dtype)
        expected = expected + dense_reference(x, weight, first["indices"], None, grad_y)["grad_weight"]
        magnitudes = magnitudes + dense_reference(x.abs(), weight.abs(), first["indices"], None, grad_y.abs())["grad_weight"]
    assert_close(layers[1].weight.grad, expected, 2 * TOLERANCE[dtype], magnitudes)


def test_gradcheck_float64_torch_backend():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=generator, requires_grad=True)
    indices = torch.randint(0, 9, (7, 4), generator=generator)
    indices[0, :2] = 3  # a duplicate within a row
    assert torch.autograd.gradcheck(lambda *a: fixed_fanin_linear(*a, backend="torch"), (x, weight, indices, bias))


def test_leading_dimensions_are_kept():
    layer = FixedFanInLinear(6, 5, 3)
    x = torch.randn(2, 3, 4, 6)
    y = layer(x)
    assert y.shape == (2, 3, 4, 5)
    torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias)


@given(st.integers(1, 64), st.integers(1, 300), st.data())
@settings(max_examples=60, deadline=None)
def test_module_rows_hold_distinct_in_range_indices(in_features, out_features, data):
    fan_in = data.draw(st.integers(1, in_features))
    layer = FixedFanInLinear(in_features, out_features, fan_in)
    indices = layer.indices
    assert indices.dtype == torch.int32 and indices.shape == (out_features, fan_in)
    assert int(indices.min()) >= 0 and int(indices.max()) < in_features
    assert bool((indices.sort(dim=1).values.diff(dim=1) > 0).all()), "a row repeats an index"


def test_module_init_matches_dense_linear_scale():
    layer = FixedFanInLinear(1000, 2000, 64)
    bound = 64 ** -0.5
    assert float(layer.weight.detach().abs().max()) <= bound and float(layer.bias.detach().abs().max()) <= bound
    # U(-b, b) has standard deviation b / sqrt(3), as nn.Linear(64, L) has
    assert abs(float(layer.weight.detach().std()) - bound / 3 ** 0.5) < 0.01 * bound


def test_index_draw_is_uniform():
    """Each feature should be picked about equally often (chi-square-like bound)."""
    counts = torch.bincount(sparse_layer.random_distinct_indices(20000, 10, 3).long().flatten(), minlength=10)
    assert float((counts - 6000).abs().max()) < 400  # ~5 standard deviations


def test_to_dense_matches_forward():
    layer = FixedFanInLinear(30, 40, 5)
    x = torch.randn(8, 30)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    assert (layer.to_dense() != 0).sum(dim=1).max() <= 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(in_features=4, out_features=3, fan_in=5), "fan_in"),
    (dict(in_features=4, out_features=3, fan_in=0), "fan_in"),
    (dict(in_features=4, out_features=0, fan_in=2), "out_features"),
    (dict(in_features=4, out_features=3, fan_in=2, backend="gpu"), "backend"),
])
def test_module_rejects_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FixedFanInLinear(**kwargs)


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.randn(3, 5, dtype=torch.float32)[:, :0]), "no input features"),
    (dict(x=torch.ones(3, 8, dtype=torch.int64)), "floating-point"),
    (dict(weight=torch.randn(4)), "weight"),
    (dict(indices=torch.zeros(4, 3, dtype=torch.int32)), "indices"),
    (dict(indices=torch.zeros(4, 2, dtype=torch.float32)), "indices"),
    (dict(indices=torch.full((4, 2), 8, dtype=torch.int32)), r"\[0, 8\)"),
    (dict(indices=torch.full((4, 2), -1, dtype=torch.int32)), r"\[0, 8\)"),
    (dict(bias=torch.randn(5)), "bias"),
    (dict(backend="tpu"), "backend"),
])
def test_function_rejects_bad_arguments(change, message):
    arguments = dict(x=torch.randn(3, 8), weight=torch.randn(4, 2),
                     indices=torch.zeros(4, 2, dtype=torch.int32), bias=None, backend="torch")
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        fixed_fanin_linear(**arguments)


def test_module_rejects_wrong_input_width():
    with pytest.raises(ValueError, match=r"\[..., 6\]"):
        FixedFanInLinear(6, 4, 2)(torch.randn(3, 7))


@pytest.mark.parametrize("backend", ["cuda", "cuda-simple"])
def test_cuda_backend_refuses_cpu_tensors(backend):
    with pytest.raises(ValueError, match="CUDA device"):
        fixed_fanin_linear(torch.randn(2, 3), torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.int32), backend=backend)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and cupy")
@pytest.mark.parametrize("backend", ["cuda", "cuda-simple", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@settings(max_examples=60, deadline=None)
@given(problem=problems(max_size=150), needs=st.sampled_from([("x", "weight"), ("x",), ("weight",)]))
def test_gpu_backends_match_dense_reference(backend, dtype, problem, needs):
    """cuda: the tiled kernels (these tiles always fit); cuda-simple: the simple ones."""
    check_against_reference(problem, backend, dtype, device="cuda", needs=needs)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and cupy")
def test_cuda_backend_is_chosen_automatically():
    assert sparse_layer._resolve_backend("auto", torch.randn(2, 3, device="cuda")) is sparse_layer.CudaOps
    assert sparse_layer._resolve_backend("auto", torch.randn(2, 3, device="cuda").double()) is sparse_layer.TorchOps
    assert sparse_layer._resolve_backend("cuda-simple", torch.randn(2, 3, device="cuda")) is sparse_layer.SimpleCudaOps


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and cupy")
def test_cuda_kernels_address_more_than_2_31_outputs():
    """B * L > 2^31 (as at Amazon-3M): flat offsets past 2^31 must not wrap. About 15 GB."""
    batch, in_features, fan_in, tail = 1024, 16, 2, 4096
    labels = 2**31 // batch + tail
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, in_features, device="cuda", generator=generator).bfloat16().requires_grad_()
    weight = torch.randn(labels, fan_in, device="cuda", generator=generator).bfloat16().requires_grad_()
    indices = torch.randint(0, in_features, (labels, fan_in), device="cuda", generator=generator, dtype=torch.int32)
    y = fixed_fanin_linear(x, weight, indices, backend="cuda")
    grad_y = torch.zeros_like(y)
    grad_y[:, -tail:] = 1  # only the labels whose outputs lie past offset 2^31 send gradient
    y.backward(grad_y)

    last = slice(labels - tail, labels)
    gathered = x.detach().double()[:, indices[last].long()]  # [B, tail, k]
    expected_y = (gathered * weight.detach()[last].double()).sum(-1)
    torch.testing.assert_close(y[:, last].double(), expected_y, rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(weight.grad[last].double(), gathered.sum(0), rtol=1.6e-2, atol=0.5)
    expected_grad_x = torch.zeros(batch, in_features, dtype=torch.float64, device="cuda")
    expected_grad_x.index_add_(1, indices[last].reshape(-1).long(),
                               weight.detach()[last].double().reshape(1, -1).expand(batch, -1))
    torch.testing.assert_close(x.grad.double(), expected_grad_x, rtol=1.6e-2, atol=1.6e-2)


def test_module_checks_indices_again_after_they_change():
    """The module skips the range check while its indices are unchanged, and only then."""
    layer = FixedFanInLinear(6, 4, 2)
    layer(torch.randn(3, 6))
    layer.indices[0, 0] = 6  # out of range, written in place as a buggy rewire might
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        layer(torch.randn(3, 6))


@settings(max_examples=40, deadline=None)
@given(problems(max_size=20), st.integers(1, 25), st.sampled_from([1, 7, 1 << 22]))
def test_transposed_connectivity_lists_every_slot_by_chunk_and_feature(problem, chunk, sort_slots):
    """Brute force: chunk c's slots that read feature d are exactly order[starts[c*D+d]:starts[c*D+d+1]],
    in slot order; whether the chunks are sorted one at a time, a few at a time or all at once."""
    indices = problem["indices"]
    (labels, fan_in), in_features = indices.shape, problem["x"].shape[1]
    with mock.patch.object(sparse_layer, "SORT_SLOTS", sort_slots):
        order, starts = sparse_layer.transpose_connectivity(indices, in_features, chunk)
    assert order.dtype == starts.dtype == torch.int32
    chunks = -(-labels // chunk)
    assert starts.shape == (chunks * in_features + 1,) and int(starts[-1]) == labels * fan_in
    for c in range(chunks):
        for d in range(in_features):
            expected = [l * fan_in + j for l in range(c * chunk, min((c + 1) * chunk, labels))
                        for j in range(fan_in) if indices[l, j] == d]
            assert order[starts[c * in_features + d]:starts[c * in_features + d + 1]].tolist() == expected


MODULE_BACKENDS = ["torch"] + (["cuda"] if GPU else [])


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_module_gradients_follow_new_indices_after_a_rewire_and_a_load(backend):
    """The module keeps its transposed connectivity between steps; after the indices change in
    place (as dst.rewire does) or are loaded, grad-x must follow the new ones."""
    device = "cuda" if backend.startswith("cuda") else "cpu"
    generator = torch.Generator().manual_seed(4)
    layer = FixedFanInLinear(30, 300, 5, backend=backend, generator=generator).to(device)
    other = FixedFanInLinear(30, 300, 5, generator=generator).to(device)
    x = torch.randn(7, 30, generator=generator).to(device)

    def check():
        x_ = x.clone().requires_grad_()
        layer(x_).square().sum().backward()
        x64 = x.double().requires_grad_()
        (x64 @ layer.to_dense().double().T + layer.bias.double()).square().sum().backward()
        torch.testing.assert_close(x_.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)

    check()
    with torch.no_grad():
        layer.indices[:, 0] = (layer.indices[:, 0] + 1) % 30  # rows may now repeat a feature: allowed
    check()
    layer.load_state_dict(other.state_dict())
    check()


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and cupy")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gradients_are_the_same_bits_every_run(dtype):
    """The gather grad-x and the tiled grad-w have no float atomics: two runs on the same input
    give identical bits (B = 200: several batch tiles)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    layer = FixedFanInLinear(768, 20_000, 32, backend="cuda").to("cuda", dtype)
    x = torch.randn(200, 768, device="cuda", dtype=dtype, generator=generator).requires_grad_()
    grad_y = torch.randn(200, 20_000, device="cuda", dtype=dtype, generator=generator)
    runs = []
    for _ in range(2):
        x.grad = layer.weight.grad = None
        layer(x).backward(grad_y)
        runs.append([x.grad.clone(), layer.weight.grad.clone()])
    for first, second in zip(*runs):
        assert torch.equal(first.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           second.view(torch.int16 if dtype != torch.float32 else torch.int32))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 9), st.integers(0, 2**16), st.booleans())
def test_from_dense_keeps_each_rows_largest_weights(in_features, labels, seed, ties):
    """Against brute force in float64: row by row, the fan_in entries of largest |w| (ties: lower
    input first), the rest zero; the layer then computes x @ kept.T + b."""
    generator = torch.Generator().manual_seed(seed)
    fan_in = 1 + seed % in_features
    linear = torch.nn.Linear(in_features, labels)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(labels, in_features, generator=generator))
        if ties:  # equal magnitudes, of both signs: the choice must still be the lower inputs
            linear.weight.copy_(linear.weight.sign() * linear.weight.abs().round())
    layer = FixedFanInLinear.from_dense(linear, fan_in)
    dense = linear.weight.detach().double()
    expected = torch.zeros_like(dense)
    for row in range(labels):
        order = sorted(range(in_features), key=lambda d: (-abs(float(dense[row, d])), d))[:fan_in]
        expected[row, order] = dense[row, order]
    assert torch.equal(layer.to_dense().double(), expected)
    assert all(len(set(row.tolist())) == fan_in for row in layer.indices)
    x = torch.randn(5, in_features, generator=generator)
    torch.testing.assert_close(layer(x).double(), x.double() @ expected.T + linear.bias.detach().double(),
                               rtol=1e-5, atol=1e-5)  # float32 sums against float64
    with pytest.raises(ValueError, match="fan_in must be in"):
        FixedFanInLinear.from_dense(linear, in_features + 1)
