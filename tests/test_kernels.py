"""kernels.cu without a GPU: compiled by nvcc for sm_80/sm_90, and run on the CPU through
cuda_shim.h (g++), where the exact kernel source is property-tested against the dense reference."""
import ctypes
import shutil
import subprocess

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparse_layer
from conftest import ROOT
from test_sparse_layer import check_against_reference, problems

SHIM_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_with_nvcc(tmp_path, arch):
    """Every kernel the runtime asks cupy for must compile; taking a template's address
    instantiates it, as cupy's name_expressions do."""
    uses = "\n".join(f"  (void)&{name}<T>;" for name in sparse_layer.KERNEL_NAMES)
    types = "\n".join(f"template void use<{t}>();" for t in sparse_layer.KERNEL_TYPES.values())
    source = tmp_path / "instantiate.cu"
    source.write_text(f'#include "{ROOT / "kernels.cu"}"\n'
                      f"template <typename T> void use() {{\n{uses}\n}}\n{types}\n")
    cubin = tmp_path / "kernels.cubin"
    result = subprocess.run(["nvcc", f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings",
                             "-cubin", str(source), "-o", str(cubin)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    symbols = cubin.read_bytes()
    for name in sparse_layer.KERNEL_NAMES:
        assert symbols.count(name.encode()) >= 3, f"{name} missing for some dtype"


def build_shim(directory, kernel_source):
    """Compile tests/kernel_shim.cpp against `kernel_source` (the text of a kernels.cu)."""
    (directory / "tests").mkdir(parents=True, exist_ok=True)
    for name in ("kernel_shim.cpp", "cuda_shim.h"):
        shutil.copy(ROOT / "tests" / name, directory / "tests" / name)
    (directory / "kernels.cu").write_text(kernel_source)
    library = directory / "libkernel_shim.so"
    subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Werror",
                    "-Wno-unknown-pragmas",  # g++ does not know CUDA's #pragma unroll
                    str(directory / "tests" / "kernel_shim.cpp"), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    return build_shim(tmp_path_factory.mktemp("shim"), (ROOT / "kernels.cu").read_text())


def shim_ops(library, tiled=False, max_blocks=None, multiprocessors=2):
    """sparse_layer.CudaOps with its launcher swapped for one that runs the kernel on the CPU.

    tiled=False: the simple kernels, with at most `max_blocks` blocks (fewer blocks than work
    exercises the grid-stride loops). tiled=True: the tiled kernels with 2 warps a block on a
    pretend GPU of `multiprocessors` multiprocessors with room for one block each.
    """

    def launch(name, dtype, blocks, threads, shared_bytes, *args):
        if max_blocks is not None:
            blocks = min(blocks, max_blocks)
        function = getattr(library, f"{name}_{SHIM_DTYPES[dtype]}")
        arguments = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a)
                     for a in args]
        function(ctypes.c_uint(blocks), ctypes.c_uint(threads), ctypes.c_uint(shared_bytes), *arguments)

    room = 1 << 20 if tiled else 0  # shared bytes per block: enough for any test tile, or none
    return type("ShimOps", (sparse_layer.CudaOps,), {
        "launch": staticmethod(launch), "tile_threads": 64,
        "limits": staticmethod(lambda device: (multiprocessors, room, room + 1024))})


KERNEL_SETS = {"simple": dict(tiled=False), "simple, 1 block": dict(tiled=False, max_blocks=1),
               "simple, 2 blocks": dict(tiled=False, max_blocks=2),
               "tiled": dict(tiled=True), "tiled, 1 block": dict(tiled=True, multiprocessors=1),
               "tiled, 3 blocks": dict(tiled=True, multiprocessors=3)}


@pytest.mark.parametrize("dtype", list(SHIM_DTYPES))
@settings(max_examples=25, deadline=None)
@given(problem=problems(max_size=40), kernels=st.sampled_from(list(KERNEL_SETS)))
def test_shim_kernels_match_dense_reference(shim, dtype, problem, kernels):
    ops = shim_ops(shim, **KERNEL_SETS[kernels])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_layer, "_resolve_backend", lambda backend, x: ops)
        check_against_reference(problem, "cuda", dtype)


@pytest.mark.parametrize("dtype", list(SHIM_DTYPES))
def test_tiled_shim_kernels_on_several_batch_tiles(shim, dtype):
    """B = 150: three batch tiles, the last one partial; k = 70: three slot chunks."""
    generator = torch.Generator().manual_seed(2)
    problem = {"x": torch.randn(150, 90, generator=generator), "weight": torch.randn(37, 70, generator=generator),
               "indices": sparse_layer.random_distinct_indices(37, 90, 70, generator),
               "bias": torch.randn(37, generator=generator), "grad_y": torch.randn(150, 37, generator=generator)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_layer, "_resolve_backend", lambda backend, x: shim_ops(shim, tiled=True))
        check_against_reference(problem, "cuda", dtype)


@pytest.mark.parametrize("tiled, mutation", [
    (False, ("for (int j = 0; j < fan_in; ++j) acc +=", "for (int j = 1; j < fan_in; ++j) acc +=")),  # forward
    (False, ("if (g == 0.0f) continue;", "if (g != 0.0f) continue;")),  # grad_input
    (False, ("for (int b = 0; b < batch; ++b)", "for (int b = 0; b + 1 < batch; ++b)")),  # grad_weight
    (True, ("acc1 += slots[j].weight", "acc1 += 0 * slots[j].weight")),  # forward, odd samples
    (True, ("if (b0 + c < batch && tile[e] != 0.0f)", "if (b0 + c + 1 < batch && tile[e] != 0.0f)")),  # grad_input flush
    (True, ("(upper ? high : low) + __shfl_xor_sync", "(upper ? low : high) + __shfl_xor_sync")),  # grad_weight sums
    (True, ("*out = (b0 == 0 ? 0.0f : *out) + mine;", "*out = mine;")),  # grad_weight over batch tiles
    (True, ("atomicAdd(row + lane + WARP, g1", "atomicAdd(row + lane, g1")),  # grad_input lanes
])
def test_a_broken_kernel_is_caught(shim, tmp_path, tiled, mutation):
    """The comparison above can fail: a kernels.cu with one deliberate bug must not pass it."""
    source = (ROOT / "kernels.cu").read_text()
    assert mutation[0] in source
    broken = shim_ops(build_shim(tmp_path, source.replace(mutation[0], mutation[1])), tiled=tiled)
    generator = torch.Generator().manual_seed(1)
    problem = {"x": torch.randn(70, 6, generator=generator), "weight": torch.randn(5, 3, generator=generator),
               "indices": torch.randint(0, 6, (5, 3), generator=generator, dtype=torch.int32),
               "bias": None, "grad_y": torch.randn(70, 5, generator=generator)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_layer, "_resolve_backend", lambda backend, x: broken)
        with pytest.raises(AssertionError):
            check_against_reference(problem, "cuda", torch.float32)


def convert(shim, function, values, out_dtype):
    out = torch.empty(values.shape, dtype=out_dtype)
    getattr(shim, function)(ctypes.c_void_p(values.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                            ctypes.c_longlong(values.numel()))
    return out


@pytest.mark.parametrize("dtype, name", [(torch.float16, "half"), (torch.bfloat16, "bfloat16")])
def test_16bit_conversions_match_torch_on_every_bit_pattern(shim, dtype, name):
    every_pattern = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    widened = convert(shim, f"{name}_to_float", every_pattern, torch.float32)
    expected = every_pattern.float()
    assert torch.equal(widened.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(widened[keep].view(torch.int32), expected[keep].view(torch.int32))


@pytest.mark.parametrize("dtype, name", [(torch.float16, "half"), (torch.bfloat16, "bfloat16")])
def test_16bit_rounding_matches_torch(shim, dtype, name):
    """Round-to-nearest-even from float, on random floats over the whole range and on the exact
    halfway points between neighbouring 16-bit values (where ties-to-even decides)."""
    generator = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=generator, dtype=torch.int64)
    floats = random_bits.to(torch.int32).view(torch.float32)
    grid = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    grid = grid[grid.isfinite()].unique()
    halfway = (grid[:-1].double() + grid[1:].double()) / 2
    small = torch.linspace(-1e-4, 1e-4, 20001)  # the half subnormal range
    values = torch.cat([floats, halfway.float(), small, torch.tensor([float("inf"), -float("inf"), 7e4, -7e4])])
    values = values[~values.isnan()]
    narrowed = convert(shim, f"float_to_{name}", values, dtype)
    assert torch.equal(narrowed.view(torch.int16), values.to(dtype).view(torch.int16))
    assert convert(shim, f"float_to_{name}", torch.tensor([float("nan")]), dtype).isnan().all()
