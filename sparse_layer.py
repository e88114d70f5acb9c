"""The fixed fan-in sparse layer (paper, Section 3): every output label reads exactly k inputs.

A dense classifier stores W[L, D]. Here label l keeps only k of the D input features, so the layer
stores two [L, k] tensors, `weight` and `indices`, and computes

    y[b, l] = sum_j weight[l, j] * x[b, indices[l, j]] + bias[l].

At Amazon-670K (L = 670,091, D = 768, k = 128) that is 6x fewer parameters, and the optimizer
state shrinks with them. dst.py rewires `indices` during training (SET); this file only computes.

Two backends compute the same function, on the transposed activations xT[D, B] (a row per
feature, so that gathering the features of a label reads whole rows):
  * "torch": embedding_bag, index_add_ and gathers in label chunks, on the CPU or any GPU; it
    never builds a dense [L, D] matrix nor a [B, L, k] tensor larger than CHUNK_ELEMENTS;
  * "cuda": the kernels of kernels.cu, compiled once per process with cupy (NVRTC): the tiled
    set where a tile of xT fits in shared memory, the simple set otherwise ("cuda-simple": the
    simple set always, to compare the two).
"auto" picks "cuda" for GPU tensors when cupy is installed, "torch" otherwise.
"""
import functools
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Largest [labels, k, B] temporary of the torch backend, by device type. CPU: 4 MB in fp32; measured
# on 2 cores at L = 50k, k = 32, B = 64, 64 MB chunks made both gradients 2-3x slower (they stop
# fitting in cache). GPU: 256 MB, since there every chunk costs a few kernel launches.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}
BACKENDS = ("auto", "torch", "cuda", "cuda-simple")  # cuda-simple: never the tiled kernels


# ---------------------------------------------------------------------------------------------
# Backend "torch". Each function mirrors one kernel of kernels.cu; sums accumulate in float32
# (float64 stays float64, for gradcheck).

def _accumulation_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _label_chunks(num_labels, fan_in, batch, device):
    step = max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"]) // max(1, fan_in * batch))
    for start in range(0, num_labels, step):
        yield slice(start, min(start + step, num_labels))


class TorchOps:
    @staticmethod
    def forward(xT, weight, indices, bias):
        acc = _accumulation_dtype(xT.dtype)
        xT_acc = xT.to(acc)
        yT = torch.empty(weight.shape[0], xT.shape[1], dtype=xT.dtype, device=xT.device)
        for rows in _label_chunks(*weight.shape, xT.shape[1], xT.device):
            # EmbeddingBag is exactly this product: bag l sums the rows indices[l, :] of the
            # "embedding table" xT, each scaled by its per-sample weight weight[l, j].
            bags = F.embedding_bag(indices[rows], xT_acc, per_sample_weights=weight[rows].to(acc), mode="sum")
            yT[rows] = (bags + bias[rows, None].to(acc)).to(xT.dtype)
        return yT

    @staticmethod
    def grad_input(grad_yT, weight, indices, in_features):
        acc = _accumulation_dtype(grad_yT.dtype)
        grad_xT = torch.zeros(in_features, grad_yT.shape[1], dtype=acc, device=grad_yT.device)
        for rows in _label_chunks(*weight.shape, grad_yT.shape[1], grad_yT.device):
            # contribution of (l, j) to feature indices[l, j]: weight[l, j] * grad_y[:, l]
            parts = weight[rows, :, None].to(acc) * grad_yT[rows, None, :].to(acc)  # [c, k, B]
            grad_xT.index_add_(0, indices[rows].reshape(-1), parts.reshape(-1, grad_yT.shape[1]))
        return grad_xT.to(grad_yT.dtype)

    @staticmethod
    def grad_weight(grad_yT, xT, indices):
        acc = _accumulation_dtype(xT.dtype)
        grad_weight = torch.empty(indices.shape, dtype=xT.dtype, device=xT.device)
        for rows in _label_chunks(*indices.shape, xT.shape[1], xT.device):
            labels, fan_in = indices[rows].shape
            gathered = xT.index_select(0, indices[rows].reshape(-1)).view(labels, fan_in, -1)  # [c, k, B]
            dots = (gathered.to(acc) * grad_yT[rows, None, :].to(acc)).sum(-1)
            grad_weight[rows] = dots.to(xT.dtype)
        return grad_weight


# ---------------------------------------------------------------------------------------------
# Backend "cuda": kernels.cu through cupy, zero-copy via DLPack, on PyTorch's current stream.

SIMPLE_KERNELS = ("fixed_fanin_forward", "fixed_fanin_grad_input", "fixed_fanin_grad_weight")
KERNEL_NAMES = SIMPLE_KERNELS + tuple(name + "_tiled" for name in SIMPLE_KERNELS)
KERNEL_TYPES = {torch.float32: "float", torch.float16: "half16", torch.bfloat16: "bfloat16"}
THREADS_PER_BLOCK = 256  # simple kernels
MAX_BLOCKS = 1 << 20  # simple kernels loop grid-stride over what one launch does not cover
TILE_B, SLOT_BYTES = 64, 8  # as in kernels.cu: samples per tile, sizeof(Slot)


def launch_config(num_threads):
    """(blocks, threads per block) of a 1-D grid-stride launch; also used by the CPU shim tests."""
    return max(1, min(math.ceil(num_threads / THREADS_PER_BLOCK), MAX_BLOCKS)), THREADS_PER_BLOCK


def cupy_available():
    try:
        import cupy  # noqa: F401  (GPU-only dependency)
        return True
    except ImportError:
        return False


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compile kernels.cu once per process; cupy caches the binary on disk across processes."""
    import cupy
    names = [f"{name}<{t}>" for name in KERNEL_NAMES for t in KERNEL_TYPES.values()]
    source = (Path(__file__).parent / "kernels.cu").read_text()
    module = cupy.RawModule(code=source, options=("-std=c++17",), name_expressions=names)
    return {name: module.get_function(name) for name in names}


@functools.lru_cache(maxsize=None)
def _gpu_limits(device_index):
    import cupy
    attributes = cupy.cuda.Device(device_index).attributes
    return (attributes["MultiProcessorCount"], attributes["MaxSharedMemoryPerBlockOptin"],
            attributes["MaxSharedMemoryPerMultiprocessor"])


@functools.lru_cache(maxsize=None)
def _cupy_stream(pointer, device_index):
    import cupy
    return cupy.cuda.ExternalStream(pointer, device_index)


def _as_cupy(tensor):
    """A zero-copy cupy view; 16-bit floats travel as int16 (cupy has no bfloat16)."""
    import cupy
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.view(torch.int16)
    return cupy.from_dlpack(tensor.detach())


@functools.lru_cache(maxsize=None)
def _kernel(name, shared_bytes):
    """A compiled kernel allowed `shared_bytes` of dynamic shared memory (past 48 KB, CUDA wants
    an opt-in per kernel: a driver call, made once per kernel and size rather than per launch)."""
    kernel = _kernels()[name]
    if shared_bytes > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = shared_bytes
    return kernel


def _launch(name, dtype, blocks, threads, shared_bytes, *args):
    import cupy
    kernel = _kernel(f"{name}<{KERNEL_TYPES[dtype]}>", shared_bytes)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    # On PyTorch's current stream: ordered after the ops that produced the inputs, no sync needed.
    with cupy.cuda.Device(device.index), _cupy_stream(torch.cuda.current_stream(device).cuda_stream, device.index):
        # Python ints would be passed as 64-bit; the kernels take 32-bit ints.
        args = tuple(_as_cupy(a) if isinstance(a, torch.Tensor) else np.int32(a) for a in args)
        kernel((blocks,), (threads,), args, shared_mem=shared_bytes)  # cupy raises if the launch fails


class CudaOps:
    """The kernels of kernels.cu: tiled where the activation tile fits in shared memory, else
    simple. `launch` and `limits` are the seams the CPU shim tests replace."""
    launch = staticmethod(_launch)
    tile_threads = 1024
    use_tiles = True

    @staticmethod
    def limits(device):
        """(multiprocessors, shared bytes one block may have, shared bytes per multiprocessor)."""
        return _gpu_limits(device.index)

    @classmethod
    def tiled_launch(cls, device, tile_bytes, num_labels):
        """(blocks, threads, shared bytes) of a tiled kernel, or None where its tile does not fit:
        as many blocks as stay resident at once, so that each block copies each tile once."""
        shared = cls.tile_threads * SLOT_BYTES + tile_bytes  # a slot buffer per lane, the tile
        multiprocessors, per_block, per_multiprocessor = cls.limits(device)
        if not cls.use_tiles or shared > per_block:
            return None
        # at most 2048 threads per multiprocessor; CUDA reserves 1 KB of shared memory per block
        resident = max(1, min(2048 // cls.tile_threads, per_multiprocessor // (shared + 1024)))
        blocks = min(multiprocessors * resident, math.ceil(num_labels / (cls.tile_threads // 32)))
        return blocks, cls.tile_threads, shared

    @classmethod
    def forward(cls, xT, weight, indices, bias):
        (labels, fan_in), (in_features, batch) = weight.shape, xT.shape
        yT = torch.empty(labels, batch, dtype=xT.dtype, device=xT.device)
        if yT.numel() == 0:
            return yT
        tiled = cls.tiled_launch(xT.device, in_features * TILE_B * xT.element_size(), labels)
        if tiled:
            cls.launch("fixed_fanin_forward_tiled", xT.dtype, *tiled,
                       xT, weight, indices, bias, yT, labels, fan_in, batch, in_features)
        else:
            cls.launch("fixed_fanin_forward", xT.dtype, *launch_config(labels * batch), 0,
                       xT, weight, indices, bias, yT, labels, fan_in, batch)
        return yT

    @classmethod
    def grad_input(cls, grad_yT, weight, indices, in_features):
        (labels, fan_in), batch = weight.shape, grad_yT.shape[1]
        # float32 buffer: the kernels accumulate with float atomics
        grad_xT = torch.zeros(in_features, batch, dtype=torch.float32, device=grad_yT.device)
        if grad_xT.numel() == 0 or weight.numel() == 0:
            return grad_xT.to(grad_yT.dtype)
        tiled = cls.tiled_launch(grad_yT.device, in_features * TILE_B * 4, labels)
        if tiled:
            cls.launch("fixed_fanin_grad_input_tiled", grad_yT.dtype, *tiled,
                       grad_yT, weight, indices, grad_xT, labels, fan_in, batch, in_features)
        else:
            cls.launch("fixed_fanin_grad_input", grad_yT.dtype, *launch_config(labels * batch), 0,
                       grad_yT, weight, indices, grad_xT, labels, fan_in, batch)
        return grad_xT.to(grad_yT.dtype)

    @classmethod
    def grad_weight(cls, grad_yT, xT, indices):
        (labels, fan_in), (in_features, batch) = indices.shape, xT.shape
        if indices.numel() == 0 or batch == 0:
            return torch.zeros(labels, fan_in, dtype=xT.dtype, device=xT.device)
        tiled = cls.tiled_launch(xT.device, in_features * TILE_B * xT.element_size(), labels)
        if tiled:  # sums over batch tiles in float; one cast at the end
            grad_weight = torch.empty(labels, fan_in, dtype=torch.float32, device=xT.device)
            cls.launch("fixed_fanin_grad_weight_tiled", xT.dtype, *tiled,
                       grad_yT, xT, indices, grad_weight, labels, fan_in, batch, in_features)
            return grad_weight.to(xT.dtype)
        grad_weight = torch.empty(labels, fan_in, dtype=xT.dtype, device=xT.device)
        cls.launch("fixed_fanin_grad_weight", xT.dtype, *launch_config(labels * fan_in), 0,
                   grad_yT, xT, indices, grad_weight, labels, fan_in, batch)
        return grad_weight


class SimpleCudaOps(CudaOps):
    """Backend "cuda-simple": the simple kernels whatever the size (bench.py compares the sets)."""
    use_tiles = False


# ---------------------------------------------------------------------------------------------
# Autograd and the public function.

class _FixedFanIn(torch.autograd.Function):
    """y = fixed fan-in product of x[B, D] plus bias; differentiable in x, weight and bias, not in
    indices. y is returned as the transpose of the backends' yT[L, B]: elementwise ops after it
    keep that layout, so the gradient arrives as [L, B] again and needs no transposing copy."""

    @staticmethod
    def forward(ctx, x, weight, indices, bias, ops):
        xT = x.t().contiguous()
        ctx.save_for_backward(xT, weight, indices)
        ctx.ops = ops
        return ops.forward(xT, weight, indices, bias).t()

    @staticmethod
    def backward(ctx, grad_y):
        xT, weight, indices = ctx.saved_tensors
        grad_yT = grad_y.t().contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.ops.grad_input(grad_yT, weight, indices, xT.shape[0]).t()
        if ctx.needs_input_grad[1]:
            grad_weight = ctx.ops.grad_weight(grad_yT, xT, indices)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_yT.sum(1, dtype=_accumulation_dtype(grad_yT.dtype)).to(grad_yT.dtype)
        return grad_x, grad_weight, None, grad_bias, None


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


def _check_arguments(x, weight, indices, bias, check_indices):
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor [..., D], got {x.dtype} of shape {tuple(x.shape)}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point [L, k] tensor, got {weight.dtype} {tuple(weight.shape)}")
    if indices.shape != weight.shape or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32/int64 of weight's shape {tuple(weight.shape)}, "
                         f"got {indices.dtype} {tuple(indices.shape)}")
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


def fixed_fanin_linear(x, weight, indices, bias=None, backend="auto", check_indices=True):
    """y[..., l] = sum_j weight[l, j] * x[..., indices[l, j]] + bias[l].

    Any in-range indices are allowed, duplicates within a row included (they add up); out-of-range
    ones raise ValueError unless check_indices=False (for callers that checked them already). The
    weight and bias are used in x's dtype, as autocast does for a dense layer.
    """
    _check_arguments(x, weight, indices, bias, check_indices)
    ops = _resolve_backend(backend, x)
    x2d = x.reshape(-1, x.shape[-1])
    # The backends always add a bias (in the kernels, before rounding); a zero one costs L reads.
    bias = torch.zeros(weight.shape[0], device=x.device) if bias is None else bias
    y = _FixedFanIn.apply(x2d, weight.to(x.dtype).contiguous(), indices.to(torch.int32).contiguous(),
                          bias.to(x.dtype).contiguous(), ops)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# The module.

def random_distinct_indices(rows, in_features, fan_in, generator=None, device=None):
    """[rows, fan_in] int32: in every row, fan_in distinct features drawn uniformly at random.

    The top-k of i.i.d. uniform scores is a uniform random k-subset; rows are drawn in chunks so
    that no [rows, in_features] matrix is ever built whole.
    """
    out = torch.empty(rows, fan_in, dtype=torch.int32, device=device)
    step = max(1, CHUNK_ELEMENTS.get(out.device.type, CHUNK_ELEMENTS["cpu"]) // max(1, in_features))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        scores = torch.rand(stop - start, in_features, generator=generator, device=device)
        out[start:stop] = scores.topk(fan_in, dim=1).indices.int()
    return out


class FixedFanInLinear(nn.Module):
    """A linear layer in which each of `out_features` outputs reads `fan_in` of the inputs.

    Parameters: weight [L, k] and bias [L]; buffer: indices [L, k] (int32, distinct per row).
    Initialised as in the official release: weight U(-1/sqrt(k), 1/sqrt(k)), bias zero.
    """

    def __init__(self, in_features, out_features, fan_in, bias=True, backend="auto", generator=None):
        super().__init__()
        if not 1 <= fan_in <= in_features:
            raise ValueError(f"fan_in must be in [1, in_features={in_features}], got {fan_in}")
        if out_features < 1:
            raise ValueError(f"out_features must be >= 1, got {out_features}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features, self.out_features, self.fan_in, self.backend = in_features, out_features, fan_in, backend
        self.weight = nn.Parameter(torch.empty(out_features, fan_in))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.register_buffer("indices", random_distinct_indices(out_features, in_features, fan_in, generator))
        self.reset_parameters(generator)
        self._checked_indices = None  # (address, version) of the indices last found in range

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        bound = 1.0 / math.sqrt(self.fan_in)
        self.weight.uniform_(-bound, bound, generator=generator)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        # Check the indices' range only after they changed (rewiring, loading, moving): the check
        # reads all of them and syncs with the GPU, which cost more than the forward kernel itself.
        version = (self.indices.data_ptr(), self.indices._version)
        y = fixed_fanin_linear(x, self.weight, self.indices, self.bias, self.backend,
                               check_indices=version != self._checked_indices)
        self._checked_indices = version
        return y

    def to_dense(self):
        """The equivalent dense [L, D] weight matrix. For tests and teaching only: at XMC scale it
        is exactly the memory this layer exists to avoid."""
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        return dense.scatter_add_(1, self.indices.long(), self.weight.detach())

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fan_in={self.fan_in}, bias={self.bias is not None}, backend={self.backend!r}")
