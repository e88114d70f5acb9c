"""The fixed fan-in sparse layer (paper, Section 3): every output label reads exactly k inputs.

A dense classifier stores W[L, D]. Here label l keeps only k of the D input features, so the layer
stores two [L, k] tensors, `weight` and `indices`, and computes

    y[b, l] = sum_j weight[l, j] * x[b, indices[l, j]] + bias[l].

At Amazon-670K (L = 670,091, D = 768, k = 128) that is 6x fewer parameters, and the optimizer
state shrinks with them. dst.py rewires `indices` during training (SET); this file only computes.

Two backends compute the same function, on the transposed activations xT[D, B] (a row per
feature, so that gathering the features of a label reads whole rows):
  * "torch": library ops on the CPU or any GPU, none of which builds a dense [L, D] matrix or an
    [L, k, B] tensor: embedding_bag for the forward pass and grad-x, sampled_addmm for grad-w;
  * "cuda": the kernels of kernels.cu, chosen, compiled and launched by cuda_launch.py (CudaOps,
    cupy, NVRTC); "cuda-simple": the simple, correct-first kernels always, to compare.
"auto" picks "cuda" for GPU tensors when cupy is installed, "torch" otherwise. Beyond the paper,
group_size G > 1 lets G labels share a row of indices (HASTE; grouped.py, torch ops everywhere).

The input gradient reads the connectivity the other way round (for every input feature, the
(label, slot) pairs that read it). transpose_connectivity builds that transposed copy with one
stable sort; FixedFanInLinear keeps it until its indices change (a rewire, a load), or with
keep_slots_by_input=False builds it a run of labels at a time in every backward pass (never saved).
Given a loss's `terms`, the layer computes its scores, that loss and their gradients a run of labels
at a time (_FixedFanInLoss): no [L, B] is held whole.
"""
import math
import warnings
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from cuda_launch import KERNEL_TYPES, CudaOps, SimpleCudaOps, cupy_available
from grouped import GroupedFanIn, expand_to_labels, group_means

# Largest temporary of random_distinct_indices ([rows, D] random scores) and of the torch backend's
# grad-w on a GPU ([labels, k, B] gathered inputs) built at once, by device type.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}
# Labels per chunk of the torch backend's grad-x gather: on the CPU, the chunk's rows of grad_yT
# stay in cache while every feature's bag reads them (at L = 100k, k = 32, B = 128 on 2 cores:
# 22 ms in chunks of 2,048 labels, 42 ms in chunks of 8,192, 69 ms in one); a GPU takes all at once.
GATHER_LABELS = {"cpu": 2048, "cuda": 1 << 31}
# Slots of grad-w computed at once when it is added into an existing gradient (`grad_into`).
ACCUMULATE_ELEMENTS = 1 << 24
BACKENDS = ("auto", "torch", "cuda", "cuda-simple")


# ---------------------------------------------------------------------------------------------
# Backend "torch". Each function mirrors one kernel of kernels.cu; sums accumulate in float32
# (promote_types: float64 stays float64, for gradcheck).

class SlotsByInput(NamedTuple):
    """The transposed connectivity, the slots by input feature: `order` [L*k] holds the flat slot
    positions l*k + j sorted by (l // chunk, indices[l, j]), `starts` [chunks*D + 1] where chunk c's
    slots that read feature d begin (int32 both, as the kernels read them)."""
    order: torch.Tensor
    starts: torch.Tensor


# Slots sorted at once by transpose_connectivity: whole label chunks a sort, so that its int64
# outputs and scratch (a GPU's stable sort: about 32 bytes a slot) stay small beside the activations.
SORT_SLOTS = 1 << 22


def labels_a_sort(chunk, fan_in):
    """Labels whose slots are sorted at once: whole chunks, about SORT_SLOTS slots."""
    return chunk * max(1, SORT_SLOTS // (chunk * max(1, fan_in)))


def transpose_connectivity(indices, in_features, chunk):
    """SlotsByInput(order, starts) of indices [L, k] for label chunks of `chunk` labels. A stable
    sort by (chunk, feature): within a chunk and feature, slots keep their order (so sums run in a
    fixed order). Chunks are the major key, so sorting a run of whole chunks at a time and placing
    the runs one after another gives the very same order."""
    labels, fan_in = indices.shape
    chunk = max(1, min(chunk, labels))
    if labels * fan_in >= 2**31:
        raise ValueError(f"L * k = {labels * fan_in:,} slots: the transposed connectivity indexes them with int32")
    chunks = max(1, math.ceil(labels / chunk))
    run = labels_a_sort(chunk, fan_in)
    # int32 keys where they fit: the sort takes half the time of int64 ones (CPU: 36 vs 83 ms for 3.2M)
    key_dtype = torch.int32 if math.ceil(run / chunk) * in_features < 2**31 else torch.int64
    order = torch.empty(labels * fan_in, dtype=torch.int32, device=indices.device)
    counts = torch.empty(chunks * in_features, dtype=torch.int64, device=indices.device)
    for start in range(0, labels, run):
        part = indices[start:start + run]
        local_labels = torch.arange(len(part), dtype=key_dtype, device=indices.device)
        chunk_of_slot = (local_labels // chunk).repeat_interleave(fan_in)
        keys, positions = torch.sort(chunk_of_slot * in_features + part.reshape(-1).to(key_dtype), stable=True)
        order[start * fan_in:(start + len(part)) * fan_in] = positions + start * fan_in
        first = start // chunk * in_features  # this run's chunks' counts, feature by feature
        counts[first:first + math.ceil(len(part) / chunk) * in_features] = torch.bincount(
            keys, minlength=math.ceil(len(part) / chunk) * in_features)
    starts = torch.zeros(chunks * in_features + 1, dtype=torch.int32, device=indices.device)
    starts[1:] = counts.cumsum(0)
    return SlotsByInput(order, starts)


class TorchOps:
    @staticmethod
    def forward(xT, weight, indices, bias):
        # EmbeddingBag is exactly this product: bag l sums the rows indices[l, :] of the "embedding
        # table" xT, each scaled by its per-sample weight weight[l, j]. One call: it builds no
        # [L, k, B] temporary (int32 indices: its faster path on the CPU, 17 vs 22 ms at L = 100k).
        acc = torch.promote_types(xT.dtype, torch.float32)
        yT = F.embedding_bag(indices, xT.to(acc), per_sample_weights=weight.to(acc), mode="sum")
        return yT.add_(bias[:, None].to(acc)).to(xT.dtype)

    @staticmethod
    def labels_per_chunk(device):
        """Labels per chunk of the slots by input feature that grad_input reads."""
        return GATHER_LABELS.get(device.type, GATHER_LABELS["cpu"])

    @staticmethod
    def grad_input(grad_yT, weight, indices, in_features, by_input, into=None):
        # A gather, like the forward pass: bag d of chunk c sums the rows grad_yT[l] of the slots
        # (l, j) of that chunk that read feature d, each scaled by weight[l, j]. `into`: a float32
        # [D, B] the chunks are added into, in order (and returned), for labels taken a run at a time.
        acc = torch.promote_types(grad_yT.dtype, torch.float32)
        grad_yT_acc = grad_yT.to(acc)
        order, starts = by_input
        labels = order // indices.shape[1]
        weights = weight.reshape(-1).to(acc)[order]
        grad_xT = torch.zeros(in_features, grad_yT.shape[1], dtype=acc, device=grad_yT.device) if into is None else into
        bounds = starts[::in_features].tolist()  # where each chunk's slots begin and end
        for c, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            offsets = starts[c * in_features:(c + 1) * in_features] - lo
            grad_xT += F.embedding_bag(labels[lo:hi], grad_yT_acc, offsets, per_sample_weights=weights[lo:hi], mode="sum")
        return grad_xT.to(grad_yT.dtype) if into is None else into

    @staticmethod
    def grad_weight(grad_yT, xT, indices):
        # grad_weight[l, j] = grad_yT[l] . xT[indices[l, j]]: the product grad_y^T x sampled at the
        # layer's connections, which is what torch.sparse.sampled_addmm computes, L*k dots and
        # nothing else (7x faster than gathering [L, k, B] copies of x, at L = 100k on 2 cores).
        acc = torch.promote_types(xT.dtype, torch.float32)
        (labels, fan_in), (in_features, batch) = indices.shape, xT.shape
        if indices.numel() == 0 or batch == 0:
            return torch.zeros(labels, fan_in, dtype=xT.dtype, device=xT.device)
        if xT.device.type != "cpu":
            return TorchOps.grad_weight_gathered(grad_yT, xT, indices)
        rows = torch.arange(0, labels * fan_in + 1, fan_in, dtype=indices.dtype, device=indices.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            # (zero values: with beta=0 the CPU kernel still multiplies them, so garbage could be NaN)
            connections = torch.sparse_csr_tensor(rows, indices.reshape(-1), torch.zeros(labels * fan_in, dtype=acc,
                                                  device=xT.device), (labels, in_features), check_invariants=False)
            dots = torch.sparse.sampled_addmm(connections, grad_yT.to(acc), xT.t().to(acc), beta=0.0)
        return dots.values().view(labels, fan_in).to(xT.dtype)

    @staticmethod
    def grad_weight_gathered(grad_yT, xT, indices):
        """grad-w on GPUs: x gathered for a chunk of labels into [c, k, B], multiplied and summed
        (sampled_addmm gave wrong 16-bit results inside this layer in a GPU test, 2026-11-28)."""
        acc = torch.promote_types(xT.dtype, torch.float32)
        (labels, fan_in), batch = indices.shape, xT.shape[1]
        grad_weight = torch.empty(labels, fan_in, dtype=xT.dtype, device=xT.device)
        step = max(1, CHUNK_ELEMENTS.get(xT.device.type, CHUNK_ELEMENTS["cpu"]) // (fan_in * batch))
        for start in range(0, labels, step):
            rows = slice(start, start + step)
            gathered = xT.index_select(0, indices[rows].reshape(-1)).view(-1, fan_in, batch).to(acc)
            grad_weight[rows] = (gathered * grad_yT[rows, None, :].to(acc)).sum(-1).to(xT.dtype)
        return grad_weight


# ---------------------------------------------------------------------------------------------
# Autograd and the public function.

class _FixedFanIn(torch.autograd.Function):
    """y = fixed fan-in product of x[B, D] plus bias; differentiable in x, weight and bias, not in
    indices. The backends compute yT[L, B]; y is its transpose, a view (`contiguous` False: a loss's
    elementwise ops keep that layout, so the gradient arrives as [L, B], with no transposing copy) or
    a contiguous [B, L] copy, as nn.Linear returns. `cache` keeps the transposed connectivity by ops,
    built in the backward pass if grad-x is needed (None: a run of labels at a time, `_grad_input`).
    `grad_into`: a parameter whose existing .grad grad-w is added into in place, a block of labels
    at a time, instead of being returned (autograd would hold it beside that .grad to add it: a
    second [L, k] when gradients accumulate over batches); the sums are the same bits."""

    @staticmethod
    def forward(ctx, x, weight, indices, bias, ops, cache, contiguous, grad_into):
        xT = x.t().contiguous()
        ctx.save_for_backward(xT, weight, indices)
        ctx.ops, ctx.cache, ctx.grad_into = ops, cache, grad_into
        y = ops.forward(xT, weight, indices, bias).t()
        return y.contiguous() if contiguous else y

    @staticmethod
    def backward(ctx, grad_y):
        xT, weight, indices = ctx.saved_tensors
        grad_yT = grad_y.t().contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(ctx.ops, ctx.cache, grad_yT, weight, indices, xT.shape[0]).t()
        if ctx.needs_input_grad[1] and ctx.grad_into is not None and ctx.grad_into.grad is not None:
            accumulated = ctx.grad_into.grad  # a block of labels at a time: no second [L, k] beside it
            step = max(1, ACCUMULATE_ELEMENTS // max(1, indices.shape[1]))
            for start in range(0, len(indices), step):
                rows = slice(start, start + step)
                accumulated[rows] += ctx.ops.grad_weight(grad_yT[rows], xT, indices[rows]).to(accumulated.dtype)
        elif ctx.needs_input_grad[1]:
            grad_weight = ctx.ops.grad_weight(grad_yT, xT, indices)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_yT.sum(1, dtype=torch.promote_types(grad_yT.dtype, torch.float32)).to(grad_yT.dtype)
        return grad_x, grad_weight, None, grad_bias, None, None, None, None


def _labels_a_run(ops, device, fan_in):  # of _grad_input and _FixedFanInLoss: labels_a_sort of `ops`' chunks
    return labels_a_sort(ops.labels_per_chunk(device) or 1, fan_in)


class _FixedFanInLoss(torch.autograd.Function):
    """The layer and a loss of its scores at once, neither the [L, B] scores nor their slope ever
    whole: scale * the sum over runs of labels of terms(start, yT)[0], where yT [run, B] holds the
    scores of labels start, start + 1, ... and `terms` gives the run's loss and slope (in yT's
    dtype). The backward pass computes each run's scores again (one more forward pass), scales
    the slope by grad_output * scale (as model._LabelLoss does) and takes the run's gradients:
    grad-x into one [D, B] in _grad_input's order, grad-w (`grad_into`: into .grad), grad-bias."""

    @staticmethod
    def forward(ctx, x, weight, indices, bias, ops, terms, scale, grad_into):
        xT = x.t().contiguous()
        ctx.save_for_backward(xT, weight, indices, bias)
        ctx.ops, ctx.terms, ctx.scale, ctx.grad_into = ops, terms, scale, grad_into
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        run = _labels_a_run(ops, x.device, indices.shape[1])
        for start in range(0, len(indices), run):
            rows = slice(start, start + run)
            total += terms(start, ops.forward(xT, weight[rows], indices[rows], bias[rows]))[0]
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        xT, weight, indices, bias = ctx.saved_tensors
        ops, needs, (in_features, batch) = ctx.ops, ctx.needs_input_grad, xT.shape
        grad_xT = torch.zeros(in_features, batch, dtype=torch.promote_types(xT.dtype, torch.float32), device=xT.device)
        accumulated = ctx.grad_into.grad if ctx.grad_into is not None else None
        grad_weight = torch.empty_like(weight) if needs[1] and accumulated is None else None
        grad_bias = torch.empty_like(bias) if needs[3] else None
        chunk, run = ops.labels_per_chunk(xT.device), _labels_a_run(ops, xT.device, indices.shape[1])
        for start in range(0, len(indices), run):
            rows = slice(start, start + run)
            _, slope = ctx.terms(start, ops.forward(xT, weight[rows], indices[rows], bias[rows]))
            grad_yT = slope.mul_(grad_output * ctx.scale)
            if needs[0]:
                _add_grad_input(ops, chunk, grad_yT, weight[rows], indices[rows], grad_xT)
            if needs[1] and accumulated is not None:
                accumulated[rows] += ops.grad_weight(grad_yT, xT, indices[rows]).to(accumulated.dtype)
            elif needs[1]:
                grad_weight[rows] = ops.grad_weight(grad_yT, xT, indices[rows])
            if needs[3]:
                grad_bias[rows] = grad_yT.sum(1, dtype=grad_xT.dtype).to(grad_yT.dtype)
        grad_x = grad_xT.to(xT.dtype).t() if needs[0] else None
        return grad_x, grad_weight, None, grad_bias, None, None, None, None


def _grad_input(ops, cache, grad_yT, weight, indices, in_features):
    """grad-x by `ops`. A kept transposed connectivity (`cache`) is built once and read whole;
    without one, it is built for a run of whole label chunks (SORT_SLOTS slots) at a time and freed
    after it, so that no [L*k] copy sits beside the gradients. The torch backend sums the chunks in
    the same order either way (the same bits); the gather kernel groups them by run, so a GPU's sums
    may round differently."""
    chunk = ops.labels_per_chunk(grad_yT.device)  # (None: these ops read no transposed copy)
    if cache is not None or chunk is None:
        if cache is not None and ops not in cache:
            cache[ops] = None if chunk is None else transpose_connectivity(indices, in_features, chunk)
        return ops.grad_input(grad_yT, weight, indices, in_features, None if cache is None else cache[ops])
    into = torch.zeros(in_features, grad_yT.shape[1], device=grad_yT.device,
                       dtype=torch.promote_types(grad_yT.dtype, torch.float32))
    run = _labels_a_run(ops, grad_yT.device, indices.shape[1])
    for start in range(0, len(indices), run):
        rows = slice(start, start + run)
        _add_grad_input(ops, chunk, grad_yT[rows], weight[rows], indices[rows], into)
    return into.to(grad_yT.dtype)


def _add_grad_input(ops, chunk, grad_yT, weight, indices, into):
    """grad-x of a run of labels added into `into` [D, B], their transposed connectivity built for it."""
    by_input = None if chunk is None else transpose_connectivity(indices, len(into), chunk)
    ops.grad_input(grad_yT, weight, indices, len(into), by_input, into)


def _resolve_backend(backend, x):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "cuda" if x.is_cuda and x.dtype in KERNEL_TYPES and cupy_available() else "torch"
    if backend.startswith("cuda"):
        if not x.is_cuda:
            raise ValueError(f"backend={backend!r} needs tensors on a CUDA device; use 'torch' or 'auto'")
        if not cupy_available():
            raise ValueError(f"backend={backend!r} needs cupy: pip install cupy-cuda12x (or cupy-cuda13x)")
        if x.dtype not in KERNEL_TYPES:
            raise ValueError(f"backend={backend!r} supports {list(KERNEL_TYPES)}, got {x.dtype}")
        return SimpleCudaOps if backend == "cuda-simple" else CudaOps
    return TorchOps


def fixed_fanin_linear(x, weight, indices, bias=None, backend="auto", check_indices=True, cache=None,
                       contiguous=True, grad_into=None, terms=None, scale=1.0, group_size=1):
    """y[..., l] = sum_j weight[l, j] * x[..., indices[l, j]] + bias[l].

    Any in-range indices are allowed, duplicates within a row included (they add up); out-of-range
    ones raise ValueError unless check_indices=False (for callers that checked them already). The
    weight and bias are used in x's dtype, as autocast does for a dense layer. `cache`: a dict in
    which the backward pass keeps the transposed connectivity of `indices` (a FixedFanInLinear
    passes its own, emptied when its indices change); by default it is built afresh every time.
    contiguous=False returns y as a transposed view of the backends' [L, B] result, which saves two
    transposing copies where the loss is the lean one of model.py (README: the layer in your model).
    grad_into: the leaf `weight` was made from, to add a second batch's gradient into its .grad in
    place (_FixedFanIn); its gradient hooks do not run then, so not under DistributedDataParallel.
    terms: a loss of the scores instead of the scores, scale * the sum of terms(start, yT)[0] over
    runs of labels (_FixedFanInLoss; model.label_loss_in_runs), over the rows of x; `cache` unused.
    group_size G > 1: indices [ceil(L / G), k], label l reading row l // G (grouped.py; no `terms`).
    """
    # Every wrong argument is a one-line ValueError here, never a wrong result or a kernel's fault.
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor [..., D], got {x.dtype} of shape {tuple(x.shape)}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point [L, k] tensor, got {weight.dtype} {tuple(weight.shape)}")
    rows = (-(-weight.shape[0] // max(1, group_size)), weight.shape[1])  # a row per group of labels (G = 1: per label)
    if group_size < 1 or indices.shape != rows or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32/int64 of shape {rows} (weight {tuple(weight.shape)}, groups of "
                         f"{group_size}), got {indices.dtype} {tuple(indices.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    tensors = [t for t in (x, weight, indices, bias) if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if indices.numel() and x.shape[-1] == 0:
        raise ValueError("x has no input features (D = 0) for the indices to read")
    if indices.numel() and check_indices:  # a pass over the indices and a host sync
        low, high = torch.aminmax(indices)
        if low < 0 or high >= x.shape[-1]:
            raise ValueError(f"indices must lie in [0, {x.shape[-1]}), got values in [{int(low)}, {int(high)}]")
    ops = _resolve_backend(backend, x)
    x2d = x.reshape(-1, x.shape[-1])
    indices = indices.to(torch.int32).contiguous()
    # The backends always add a bias (in the kernels, before rounding); a zero one costs L reads.
    bias = torch.zeros(weight.shape[0], device=x.device) if bias is None else bias
    weight, bias = weight.to(x.dtype).contiguous(), bias.to(x.dtype).contiguous()
    if group_size > 1 and terms is not None:
        raise ValueError("a loss in runs of labels (terms) needs group_size 1")
    if terms is not None:
        return _FixedFanInLoss.apply(x2d, weight, indices, bias, ops, terms, scale, grad_into)
    y = (GroupedFanIn.apply(x2d, weight, indices, bias, group_size, contiguous, grad_into) if group_size > 1
         else _FixedFanIn.apply(x2d, weight, indices, bias, ops, cache, contiguous, grad_into))
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# The module.

def random_distinct_indices(rows, in_features, fan_in, generator=None, device=None):
    """[rows, fan_in] int32: in every row, fan_in distinct features drawn uniformly at random (the
    top-k of i.i.d. uniform scores), in chunks of rows: no [rows, in_features] matrix is built whole."""
    out = torch.empty(rows, fan_in, dtype=torch.int32, device=device)
    step = max(1, CHUNK_ELEMENTS.get(out.device.type, CHUNK_ELEMENTS["cpu"]) // max(1, in_features))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        scores = torch.rand(stop - start, in_features, generator=generator, device=device)
        out[start:stop] = scores.topk(fan_in, dim=1).indices.int()
    return out


class FixedFanInLinear(nn.Module):
    """A linear layer in which each of `out_features` outputs reads `fan_in` of the inputs.
    Parameters: weight [L, k] and bias [L]; buffer: indices [L, k] (int32, distinct per row; groups
    of G labels: [ceil(L / G), k]). Initialised as the release: weight U(-1/sqrt(k), 1/sqrt(k)), bias 0."""

    def __init__(self, in_features, out_features, fan_in, bias=True, backend="auto", generator=None,
                 contiguous_output=True, group_size=1):
        super().__init__()
        self.contiguous_output = contiguous_output  # False: a transposed view (fixed_fanin_linear's `contiguous`)
        if not 1 <= fan_in <= in_features:
            raise ValueError(f"fan_in must be in [1, in_features={in_features}], got {fan_in}")
        if out_features < 1:
            raise ValueError(f"out_features must be >= 1, got {out_features}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")  # (G > 1: HASTE's groups, grouped.py)
        self.in_features, self.out_features, self.fan_in, self.backend = in_features, out_features, fan_in, backend
        self.group_size, groups = group_size, -(-out_features // group_size)
        self.weight = nn.Parameter(torch.empty(out_features, fan_in))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.register_buffer("indices", random_distinct_indices(groups, in_features, fan_in, generator))
        self.reset_parameters(generator)
        self._checked_indices = None  # (address, version) of the indices last found in range
        self._transposed = {}  # the transposed connectivity of those indices, by backend ops (cache)
        self.keep_slots_by_input = True  # False: built a run at a time in every backward pass, L*k*4 bytes less
        self.grad_in_place = False  # True: a second batch's weight gradient added into .grad in place (no DDP)

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        bound = 1.0 / math.sqrt(self.fan_in)
        self.weight.uniform_(-bound, bound, generator=generator)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x, terms=None, scale=1.0):
        """The scores [..., L]; or, given `terms`, scale * the loss they sum over runs of labels
        (fixed_fanin_linear), the scores never held whole: labels_a_run(x) labels a run."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        # Check the indices' range, and forget their transposed copy, only after they changed (a
        # rewire, a load, a move): the check syncs with the GPU, and the copy takes a sort to build.
        version = (self.indices.data_ptr(), self.indices._version)
        changed = version != self._checked_indices
        if changed or not self.keep_slots_by_input:
            self._transposed = {}
        y = fixed_fanin_linear(x, self.weight, self.indices, self.bias, self.backend,
                               check_indices=changed, cache=self._transposed if self.keep_slots_by_input else None,
                               contiguous=self.contiguous_output, grad_into=self.weight if self.grad_in_place else None,
                               terms=terms, scale=scale, group_size=self.group_size)
        self._checked_indices = version
        return y

    def labels_a_run(self, x):
        """Labels of a run when forward is given `terms` and input x (runs start at 0, run, 2 run...)."""
        return _labels_a_run(_resolve_backend(self.backend, x), x.device, self.fan_in)

    @classmethod
    def from_dense(cls, linear, fan_in, backend="auto", group_size=1):
        """The sparse layer that keeps, in each row of the nn.Linear `linear`, its fan_in weights of
        largest |w| (ties: the lower input; groups of G > 1 labels: of largest mean |w|) and its
        bias: a dense model's classifier, to fine-tune sparsely. On linear's device and dtype."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, fan_in, linear.bias is not None, backend, group_size=group_size)
        magnitude = weight.abs() if group_size == 1 else group_means(weight.abs(), group_size)
        kept = magnitude.sort(dim=1, descending=True, stable=True).indices[:, :fan_in].sort(dim=1).values
        layer = layer.to(weight.device, weight.dtype)
        with torch.no_grad():
            layer.indices.copy_(kept)
            layer.weight.copy_(weight.gather(1, expand_to_labels(kept, group_size, len(weight))))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_dense(self):
        """The equivalent dense [L, D] weight matrix: for tests and teaching only (at XMC scale, no)."""
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        indices = expand_to_labels(self.indices.long(), self.group_size, self.out_features)
        return dense.scatter_add_(1, indices, self.weight.detach())

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fan_in={self.fan_in}, bias={self.bias is not None}, backend={self.backend!r}"
                + (f", group_size={self.group_size}" if self.group_size > 1 else ""))
