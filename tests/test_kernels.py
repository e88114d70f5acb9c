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
                    str(directory / "tests" / "kernel_shim.cpp"), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    return build_shim(tmp_path_factory.mktemp("shim"), (ROOT / "kernels.cu").read_text())


def shim_ops(library, max_blocks=None):
    """sparse_layer.CudaOps with its launcher swapped for one that runs the kernel on the CPU."""

    def launch(name, dtype, num_threads, *args):
        if num_threads == 0:
            return
        blocks, threads = sparse_layer.launch_config(num_threads)
        if max_blocks is not None:  # fewer blocks than work: exercises the grid-stride loops
            blocks = min(blocks, max_blocks)
        function = getattr(library, name.removeprefix("fixed_fanin_") + "_" + SHIM_DTYPES[dtype])
        arguments = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a)
                     for a in args]
        function(ctypes.c_uint(blocks), ctypes.c_uint(threads), *arguments)

    return type("ShimOps", (sparse_layer.CudaOps,), {"launch": staticmethod(launch)})


@pytest.mark.parametrize("dtype", list(SHIM_DTYPES))
@settings(max_examples=25, deadline=None)
@given(problem=problems(max_size=40), max_blocks=st.sampled_from([None, 1, 2]))
def test_shim_kernels_match_dense_reference(shim, dtype, problem, max_blocks):
    ops = shim_ops(shim, max_blocks)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_layer, "_resolve_backend", lambda backend, x: ops)
        check_against_reference(problem, "cuda", dtype)


@pytest.mark.parametrize("mutation", [
    ("for (int j = 0; j < fan_in; ++j) acc +=", "for (int j = 1; j < fan_in; ++j) acc +="),  # forward
    ("if (g == 0.0f) continue;", "if (g != 0.0f) continue;"),  # grad_input
    ("for (int b = 0; b < batch; ++b)", "for (int b = 0; b + 1 < batch; ++b)"),  # grad_weight
])
def test_a_broken_kernel_is_caught(shim, tmp_path, mutation):
    """The comparison above can fail: a kernels.cu with one deliberate bug must not pass it."""
    source = (ROOT / "kernels.cu").read_text()
    assert mutation[0] in source
    broken = shim_ops(build_shim(tmp_path, source.replace(mutation[0], mutation[1])))
    generator = torch.Generator().manual_seed(1)
    problem = {"x": torch.randn(4, 6, generator=generator), "weight": torch.randn(5, 3, generator=generator),
               "indices": torch.randint(0, 6, (5, 3), generator=generator, dtype=torch.int32),
               "bias": None, "grad_y": torch.randn(4, 5, generator=generator)}
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
