"""The CUDA launch path (plumbing of sparse_layer.py's "cuda" backend): kernels.cu compiled once
per process by cupy (NVRTC) with the sizes it shares with Python as -D options, each kernel
launched on PyTorch's current stream with raw device addresses, and CudaOps, the backend itself:
which kernel runs, with how many blocks and how much shared memory. A paper reader can skip this
file: sparse_layer.TorchOps computes the same function with library ops.
"""
import functools
import math
from pathlib import Path

import numpy as np
import torch

SIMPLE_KERNELS = ("fixed_fanin_forward", "fixed_fanin_grad_input", "fixed_fanin_grad_weight")
KERNEL_NAMES = SIMPLE_KERNELS + ("fixed_fanin_forward_tiled", "fixed_fanin_grad_weight_tiled", "fixed_fanin_grad_input_gather")
KERNEL_TYPES = {torch.float32: "float", torch.float16: "half16", torch.bfloat16: "bfloat16"}
THREADS_PER_BLOCK = 256  # simple kernels
MAX_BLOCKS = 1 << 20  # simple kernels loop grid-stride over what one launch does not cover
# Sizes kernels.cu is compiled with, defined only here and passed as -D options (compile_options).
KERNEL_CONSTANTS = {"TILE_B": 64, "GATHER_CHUNK": 256, "SLOT_BYTES": 8}  # samples a tile, labels a chunk, sizeof(Slot)
TILE_B, GATHER_CHUNK, SLOT_BYTES = KERNEL_CONSTANTS.values()


def compile_options(**changed):
    """The -D options of kernels.cu (tests build a copy with other sizes, e.g. GATHER_CHUNK=4)."""
    return tuple(f"-D{name}={value}" for name, value in {**KERNEL_CONSTANTS, **changed}.items())


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
    module = cupy.RawModule(code=source, options=("-std=c++17", *compile_options()), name_expressions=names)
    return {name: module.get_function(name) for name in names}


@functools.lru_cache(maxsize=None)
def gpu_limits(device_index):
    import cupy
    attributes = cupy.cuda.Device(device_index).attributes
    return (attributes["MultiProcessorCount"], attributes["MaxSharedMemoryPerBlockOptin"],
            attributes["MaxSharedMemoryPerMultiprocessor"])


@functools.lru_cache(maxsize=None)
def _cupy_stream(pointer, device_index):
    import cupy
    return cupy.cuda.ExternalStream(pointer, device_index)


@functools.lru_cache(maxsize=None)
def _kernel(name, device_index, large_shared):
    """A compiled kernel; with `large_shared`, allowed all the dynamic shared memory a block may
    have. Past 48 KB, CUDA wants an opt-in per kernel: a driver call, made once per kernel and
    device. (Opting in to each launch's own size instead broke a later, larger launch of the same
    kernel: a GPU test caught it.)"""
    kernel = _kernels()[name]
    if large_shared:
        kernel.max_dynamic_shared_size_bytes = gpu_limits(device_index)[1]
    return kernel


def _kernel_argument(value):
    """Tensors travel as their raw device address (a pointer is 8 bytes), ints as 32-bit ints.
    v4 wrapped every tensor in a cupy DLPack view instead, on every launch: host time that the
    GPU spent idle (kernels_notes.md measures both)."""
    if isinstance(value, torch.Tensor):
        return np.uint64(value.data_ptr())
    return np.int32(value)


def current_stream(device_index):
    """PyTorch's current stream on a device, as a raw cudaStream_t. The public
    torch.cuda.current_stream(device) validates the device on every call (cudaGetDeviceCount):
    9.4 µs a call on an H200 machine, against 0.4 µs for the private call that Triton also uses."""
    if hasattr(torch._C, "_cuda_getCurrentRawStream"):
        return torch._C._cuda_getCurrentRawStream(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


def launch(name, dtype, blocks, threads, shared_bytes, *args):
    import cupy
    device = args[0].device
    kernel = _kernel(f"{name}<{KERNEL_TYPES[dtype]}>", device.index, shared_bytes > 48 * 1024)
    # On PyTorch's current stream: ordered after the ops that produced the inputs, no sync needed.
    with cupy.cuda.Device(device.index), _cupy_stream(current_stream(device.index), device.index):
        kernel((blocks,), (threads,), tuple(map(_kernel_argument, args)), shared_mem=shared_bytes)


# ---------------------------------------------------------------------------------------------
# sparse_layer's backend "cuda": which kernel runs, with how many blocks.

class CudaOps:
    """The kernels of kernels.cu: tiled where the activation tile fits in shared memory and grad-x
    as a gather where its chunk fits, else simple. `launch` and `limits` are the seams the CPU
    shim tests replace."""
    launch = staticmethod(launch)
    tile_threads = 1024
    use_tiles = True
    gather_chunk = GATHER_CHUNK  # labels per chunk, as compiled into kernels.cu

    @staticmethod
    def limits(device):
        """(multiprocessors, shared bytes one block may have, shared bytes per multiprocessor)."""
        return gpu_limits(device.index)

    @classmethod
    def labels_per_chunk(cls, device):
        """Labels per chunk of the slots by input feature that the gather grad-x reads (None: the
        simple kernels read none)."""
        return cls.gather_chunk if cls.use_tiles else None

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
    def gather_launch(cls, device, element_size, num_labels, batch, in_features):
        """(blocks, threads, shared bytes, features per warp, groups) of the gather grad-x kernel,
        or None where even one feature per warp does not fit. The block's accumulators for its
        features are the large part of its shared memory: where all D do not fit, the features
        are split into parts (each part reads grad_yT once more). One block per multiprocessor."""
        multiprocessors, per_block, _ = cls.limits(device)
        warps = cls.tile_threads // 32
        fixed = cls.tile_threads * SLOT_BYTES + cls.gather_chunk * TILE_B * element_size
        for parts in range(1, in_features + 1):
            per_warp = math.ceil(in_features / (warps * parts))
            shared = fixed + warps * per_warp * TILE_B * 4
            if shared <= per_block:
                break
        else:
            return None
        parts, tiles = math.ceil(in_features / (warps * per_warp)), math.ceil(batch / TILE_B)
        groups = max(1, min(math.ceil(num_labels / cls.gather_chunk), multiprocessors // (parts * tiles)))
        return groups * parts * tiles, cls.tile_threads, shared, per_warp, groups

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
    def grad_input(cls, grad_yT, weight, indices, in_features, by_input, into=None):
        """grad_xT [D, B]; or, given `into` (float32 [D, B]), added into it and it returned."""
        (labels, fan_in), batch = weight.shape, grad_yT.shape[1]
        if in_features * batch == 0 or weight.numel() == 0:
            return torch.zeros(in_features, batch, dtype=grad_yT.dtype, device=grad_yT.device) if into is None else into
        gather = by_input and cls.gather_launch(grad_yT.device, grad_yT.element_size(), labels, batch, in_features)
        if gather:  # each group of chunks sums into its own slice; the slices are added in a fixed order
            blocks, threads, shared, per_warp, groups = gather
            partial = torch.empty(groups, in_features, batch, dtype=torch.float32, device=grad_yT.device)
            cls.launch("fixed_fanin_grad_input_gather", grad_yT.dtype, blocks, threads, shared,
                       grad_yT, weight, indices, by_input.order, by_input.starts, partial,
                       labels, fan_in, batch, in_features, per_warp, groups)
            return partial.sum(0).to(grad_yT.dtype) if into is None else into.add_(partial.sum(0))
        # float32 buffer: the simple kernel scatters with float atomics
        grad_xT = torch.zeros(in_features, batch, dtype=torch.float32, device=grad_yT.device) if into is None else into
        cls.launch("fixed_fanin_grad_input", grad_yT.dtype, *launch_config(labels * batch), 0,
                   grad_yT, weight, indices, grad_xT, labels, fan_in, batch)
        return grad_xT.to(grad_yT.dtype) if into is None else into

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
