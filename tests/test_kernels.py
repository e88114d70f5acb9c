"""kernels.cu without a GPU: compiled by nvcc for sm_80/sm_90, and run on the CPU through
cuda_shim.h (g++), where the exact kernel source is property-tested against the dense reference."""
import ctypes
import re
import shutil
import subprocess

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cuda_launch
import sparse_layer
from conftest import ROOT
from test_sparse_layer import check_against_reference, problems

SHIM_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_with_nvcc(tmp_path, arch):
    """Every kernel the runtime asks cupy for must compile; taking a template's address
    instantiates it, as cupy's name_expressions do."""
    uses = "\n".join(f"  (void)&{name}<T>;" for name in cuda_launch.KERNEL_NAMES)
    types = "\n".join(f"template void use<{t}>();" for t in cuda_launch.KERNEL_TYPES.values())
    source = tmp_path / "instantiate.cu"
    source.write_text(f'#include "{ROOT / "kernels.cu"}"\n'
                      f"template <typename T> void use() {{\n{uses}\n}}\n{types}\n")
    cubin = tmp_path / "kernels.cubin"
    result = subprocess.run(["nvcc", f"-arch={arch}", "-std=c++17", *cuda_launch.compile_options(), "-Werror",
                             "all-warnings", "-Xptxas", "-v", "-cubin", str(source), "-o", str(cubin)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    symbols = cubin.read_bytes()
    for name in cuda_launch.KERNEL_NAMES:
        assert symbols.count(name.encode()) >= 3, f"{name} missing for some dtype"
    # ptxas -v: no kernel may spill registers to local memory (slow, and a sign of a run-time
    # indexed register array)
    spills = re.findall(r"(\d+) bytes spill stores", result.stderr)
    assert len(spills) >= 3 * len(cuda_launch.KERNEL_NAMES) and set(spills) == {"0"}, result.stderr


SMALL_CHUNK = 4  # labels per chunk in the shim's second build: small problems span many chunks


class Shim(ctypes.CDLL):
    gather_chunk = cuda_launch.GATHER_CHUNK


def build_shim(directory, kernel_source, gather_chunk=None):
    """Compile tests/kernel_shim.cpp against `kernel_source` (the text of a kernels.cu), with the
    -D options of the runtime's build (GATHER_CHUNK changed to `gather_chunk` if given), and load it."""
    options = cuda_launch.compile_options(**({"GATHER_CHUNK": gather_chunk} if gather_chunk else {}))
    (directory / "tests").mkdir(parents=True, exist_ok=True)
    for name in ("kernel_shim.cpp", "cuda_shim.h"):
        shutil.copy(ROOT / "tests" / name, directory / "tests" / name)
    (directory / "kernels.cu").write_text(kernel_source)
    library = directory / "libkernel_shim.so"
    subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Werror",
                    "-Wno-unknown-pragmas", *options,  # g++ does not know CUDA's #pragma unroll
                    str(directory / "tests" / "kernel_shim.cpp"), "-o", str(library)], check=True)
    shim = Shim(str(library))
    shim.gather_chunk = gather_chunk or cuda_launch.GATHER_CHUNK
    return shim


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    return build_shim(tmp_path_factory.mktemp("shim"), (ROOT / "kernels.cu").read_text())


@pytest.fixture(scope="session")
def small_chunk_shim(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    return build_shim(tmp_path_factory.mktemp("shim_small"), (ROOT / "kernels.cu").read_text(), SMALL_CHUNK)


def shim_ops(library, tiled=False, max_blocks=None, multiprocessors=2, room=None):
    """sparse_layer.CudaOps with its launcher swapped for one that runs the kernel on the CPU.

    tiled=False: the simple kernels, with at most `max_blocks` blocks (fewer blocks than work
    exercises the grid-stride loops). tiled=True: the tiled kernels with 2 warps a block on a
    pretend GPU of `multiprocessors` multiprocessors with `room` shared bytes a block (default:
    enough for any test tile), grad-x as a gather.
    """

    def launch(name, dtype, blocks, threads, shared_bytes, *args):
        if max_blocks is not None:
            blocks = min(blocks, max_blocks)
        function = getattr(library, f"{name}_{SHIM_DTYPES[dtype]}")
        arguments = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a)
                     for a in args]
        function(ctypes.c_uint(blocks), ctypes.c_uint(threads), ctypes.c_uint(shared_bytes), *arguments)

    room = room or (1 << 20 if tiled else 0)
    return type("ShimOps", (sparse_layer.CudaOps,), {
        "launch": staticmethod(launch), "tile_threads": 64, "use_tiles": tiled,
        "gather_chunk": library.gather_chunk,
        "limits": staticmethod(lambda device: (multiprocessors, room, room + 1024))})


# The gather's fixed shared memory on the shim (2 warps, fp32, chunks of SMALL_CHUNK labels) plus
# room for 2 features per warp: D > 4 splits the features into parts.
TWO_FEATURES_A_WARP = 64 * cuda_launch.SLOT_BYTES + SMALL_CHUNK * cuda_launch.TILE_B * 4 + 2 * 2 * cuda_launch.TILE_B * 4
KERNEL_SETS = {"simple": dict(tiled=False), "simple, 1 block": dict(tiled=False, max_blocks=1),
               "simple, 2 blocks": dict(tiled=False, max_blocks=2),
               "tiled": dict(tiled=True), "tiled, 1 block": dict(tiled=True, multiprocessors=1),
               "tiled, 3 blocks": dict(tiled=True, multiprocessors=3),
               "gather, small chunks": dict(tiled=True, multiprocessors=5, small=True),
               "gather, small chunks, feature parts": dict(tiled=True, multiprocessors=7, small=True,
                                                           room=TWO_FEATURES_A_WARP)}


def kernel_set(name, shim, small_chunk_shim):
    options = dict(KERNEL_SETS[name])
    return shim_ops(small_chunk_shim if options.pop("small", False) else shim, **options)


@pytest.mark.parametrize("dtype", list(SHIM_DTYPES))
@settings(max_examples=25, deadline=None)
@given(problem=problems(max_size=40), kernels=st.sampled_from(list(KERNEL_SETS)))
def test_shim_kernels_match_dense_reference(shim, small_chunk_shim, dtype, problem, kernels):
    ops = kernel_set(kernels, shim, small_chunk_shim)
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


SIMPLE, TILED = dict(tiled=False), dict(tiled=True)
GATHER = dict(tiled=True, multiprocessors=5, small=True)  # 2 chunks, 2 groups, 2 batch tiles below


@pytest.mark.parametrize("options, mutation", [
    (SIMPLE, ("for (int j = 0; j < fan_in; ++j) acc +=", "for (int j = 1; j < fan_in; ++j) acc +=")),  # forward
    (SIMPLE, ("if (g == 0.0f) continue;", "if (g != 0.0f) continue;")),  # grad_input
    (SIMPLE, ("for (int b = 0; b < batch; ++b)", "for (int b = 0; b + 1 < batch; ++b)")),  # grad_weight
    (TILED, ("acc1 += slots[j].weight", "acc1 += 0 * slots[j].weight")),  # forward, odd samples
    (TILED, ("(upper ? high : low) + __shfl_xor_sync", "(upper ? low : high) + __shfl_xor_sync")),  # grad_weight sums
    (TILED, ("*out = (b0 == 0 ? 0.0f : *out) + mine;", "*out = mine;")),  # grad_weight over batch tiles
    # the gather grad-x: the last feature's sum of a chunk, a feature change, the group stride,
    # the batch tile of the output, the chunk-local label
    (GATHER, ("    my_sums[feature * TILE_B] += acc0;\n    my_sums[feature * TILE_B + 1] += acc1;\n  }", "  }")),
    (GATHER, ("          acc0 = acc1 = 0.0f;", "          acc0 = 0.0f;")),
    (GATHER, ("for (int c = g; c < num_chunks; c += groups)", "for (int c = g; c < num_chunks; c += 1)")),
    (GATHER, ("partial[((long long)g * in_features + d) * batch + b]", "partial[((long long)g * in_features + d) * batch + b0]")),
    (GATHER, ("(int)(position / fan_in - first_label)", "(int)(position / fan_in)")),
])
def test_a_broken_kernel_is_caught(tmp_path, options, mutation):
    """The comparison above can fail: a kernels.cu with one deliberate bug must not pass it."""
    source = (ROOT / "kernels.cu").read_text()
    assert mutation[0] in source
    options = dict(options)
    chunk = SMALL_CHUNK if options.pop("small", False) else None
    broken = shim_ops(build_shim(tmp_path, source.replace(mutation[0], mutation[1]), chunk), **options)
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
