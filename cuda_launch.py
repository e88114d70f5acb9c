"""The CUDA launch path (plumbing of sparse_layer.py's "cuda" backend): kernels.cu compiled once
per process by cupy (NVRTC) with the sizes it shares with Python as -D options, and each kernel
launched on PyTorch's current stream with raw device addresses. A paper reader can skip this file:
sparse_layer.CudaOps says which kernel runs with how many blocks, this file only makes the call.
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
