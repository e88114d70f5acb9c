"""Speed and memory of the fixed fan-in layer against a dense nn.Linear of the same shape.

For every (dtype, batch B, fan-in k) it times forward and backward separately for
  sparse/cuda        - the kernels of kernels.cu as the layer runs them: tiled where the tile fits
                       (GPU with cupy only),
  sparse/cuda-simple - the simple kernels of kernels.cu (the first, correct-first set),
  sparse/torch       - the pure-PyTorch backend,
  dense        - nn.Linear(D, L), the baseline the paper's memory claim is measured against,
and prints medians over several input sets, the peak memory of one training step (GPU), the
layer's own bytes, and for the sparse layer the achieved DRAM bandwidth and the ratio of each pass
to its floor: bytes = L*k*(s+4) + B*L*s per pass (s bytes a value, int32 indices).

    python bench.py                                # GPU: Amazon-670K shape; CPU: a 1-minute size
    python bench.py --labels 100000 --batch 128 --fan-in 32 --dtype float32
    python bench.py --rewire                       # time one SET rewire (dst.py) of the whole layer
    python bench.py --memory                       # peak memory of a training step with AdamW (GPU)
    ncu --kernel-name regex:tiled python bench.py --profile --batch 128 --fan-in 32 --layers cuda
"""
import argparse
import statistics
import time

import torch
from torch import nn

import dst
import sparse_layer
from sparse_layer import FixedFanInLinear


def parse_args():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labels", type=int, default=670_091 if gpu else 50_000, help="L (default: Amazon-670K on a GPU)")
    p.add_argument("--features", type=int, default=768, help="D, the input width")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256, 512] if gpu else [64, 128])
    p.add_argument("--fan-in", type=int, nargs="+", default=[32, 64, 128] if gpu else [32, 128])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"] if gpu else ["float32"],
                   choices=["float32", "float16", "bfloat16"])
    kinds = ["cuda", "cuda-simple", "torch", "dense"]
    p.add_argument("--layers", nargs="+", default=kinds, choices=kinds)
    p.add_argument("--repeats", type=int, default=20 if gpu else 3, help="timed runs (median reported)")
    p.add_argument("--inputs", type=int, default=3, help="distinct random input sets cycled through")
    p.add_argument("--rewire", action="store_true", help="time dst.rewire (fraction 0.2, AdamW state) instead")
    p.add_argument("--memory", action="store_true", help="peak memory of AdamW training steps instead (GPU)")
    p.add_argument("--profile", action="store_true", help="one warm-up and one timed step only, for a profiler")
    p.add_argument("--bandwidth", type=float, default=3000.0,
                   help="GPU DRAM bandwidth in GB/s for the floor ratios (H100 copy bandwidth: about 3000)")
    return p.parse_args()


class Timer:
    """Wall time of a block in ms: CUDA events on a GPU (no host sync inside), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.stop.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.stop)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def make_layer(kind, labels, features, fan_in, dtype, device):
    with device:  # built where it runs: drawing 670k random index rows on the host takes seconds
        if kind == "dense":
            return nn.Linear(features, labels, dtype=dtype)
        return FixedFanInLinear(features, labels, fan_in, backend=kind).to(dtype)


def layer_bytes(layer):
    return sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))


def measure(layer, inputs, repeats):
    """Median forward and backward ms, and peak bytes of one step above the layer's own (GPU)."""
    device = inputs[0].device
    with torch.no_grad():  # output gradients in the layout of the output, as a loss computed from it gives
        grads = [torch.randn_like(layer(x)) for x in inputs]
    forward, backward = [], []
    warmup = 1 if repeats == 1 else 2
    for step in range(repeats + warmup):  # warm-up steps: kernel compilation, allocator caches
        x, grad = inputs[step % len(inputs)], grads[step % len(grads)]
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with Timer(device) as f:
            y = layer(x)
        with Timer(device) as b:
            y.backward(grad)
        if step >= warmup:
            forward.append(f.ms)
            backward.append(b.ms)
        del y
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return statistics.median(forward), statistics.median(backward), peak


def floor_bytes(labels, fan_in, batch, value_bytes):
    """DRAM bytes one pass must move at least: weights + indices once, activations of every label."""
    return labels * fan_in * (value_bytes + 4) + batch * labels * value_bytes


HEADER = ("| layer | dtype | B | k | forward ms | backward ms | total ms | speed-up vs dense | "
          "step peak MB | layer MB | fwd GB/s | fwd / floor | bwd / floor |")


def row(kind, dtype, batch, fan_in, fwd, bwd, dense_total, peak, size, bandwidth):
    sparse = kind != "dense"
    floor = floor_bytes(size[0], fan_in, batch, dtype.itemsize) if sparse else None
    cells = [kind if not sparse else f"sparse/{kind}", str(dtype).removeprefix("torch."), batch,
             fan_in if sparse else "-", f"{fwd:.2f}", f"{bwd:.2f}", f"{fwd + bwd:.2f}",
             f"{dense_total / (fwd + bwd):.1f}x" if dense_total else "-",
             "-" if peak is None else f"{peak / 2**20:.0f}",
             f"{size[1] / 2**20:.0f}",
             f"{floor / fwd / 1e6:.0f}" if sparse else "-",
             f"{fwd / (floor / bandwidth / 1e6):.1f}" if sparse and bandwidth else "-",
             f"{bwd / (2 * floor / bandwidth / 1e6):.1f}" if sparse and bandwidth else "-"]
    return "| " + " | ".join(map(str, cells)) + " |"


def bench_rewire(args, device):
    """One SET step (dst.rewire, fraction 0.2) over the whole layer, with AdamW state to reset."""
    print("| L | D | k | connections rewired | rewire ms (median) |\n|---|---|---|---|---|")
    for fan_in in args.fan_in:
        layer = make_layer("torch", args.labels, args.features, fan_in, torch.float32, device)
        optimizer = torch.optim.AdamW(layer.parameters())
        layer(torch.randn(2, args.features, device=device)).sum().backward()
        optimizer.step()  # creates the exp_avg / exp_avg_sq state that rewire() must reset
        times = []
        for step in range(args.repeats + 1):  # one warm-up
            with Timer(device) as t:
                stats = dst.rewire(layer, optimizer, fraction=0.2)
            times.append(t.ms)
        print(f"| {args.labels:,} | {args.features} | {fan_in} | {stats['rewired']:,} | "
              f"{statistics.median(times[1:]):.1f} |", flush=True)


def bench_memory(args, device):
    """Peak GPU memory of AdamW training steps of the classifier alone: weights, gradients, AdamW
    state, logits and their gradient, and the layer's temporaries; the input is not counted."""
    print("| layer | dtype | B | k | training-step peak MB | vs dense |\n|---|---|---|---|---|---|")
    for dtype in [getattr(torch, name) for name in args.dtype]:
        for batch in args.batch:
            x = torch.randn(batch, args.features, device=device, dtype=dtype, requires_grad=True)
            dense_peak = None
            for kind, fan_in in [("dense", "-")] + [(k, f) for f in args.fan_in for k in args.layers if k != "dense"]:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                layer = make_layer(kind, args.labels, args.features, fan_in, dtype, device)
                optimizer = torch.optim.AdamW(layer.parameters())
                for _ in range(2):  # the second step runs with the AdamW state in place
                    layer(x).float().square().mean().backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                peak = torch.cuda.max_memory_allocated() - base
                dense_peak = dense_peak or peak
                print(f"| {kind} | {str(dtype).removeprefix('torch.')} | {batch} | {fan_in} | {peak / 2**20:.0f} | "
                      f"{peak / dense_peak:.2f} |", flush=True)
                del layer, optimizer


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.rewire:
        return bench_rewire(args, device)
    if args.profile:
        args.repeats, args.inputs = 1, 1
    if args.memory:
        if device.type != "cuda":
            raise SystemExit("bench.py --memory measures torch.cuda.max_memory_allocated: it needs a GPU")
        return bench_memory(args, device)
    gpu_kernels = device.type == "cuda" and sparse_layer.cupy_available()
    kinds = [k for k in args.layers if gpu_kernels or not k.startswith("cuda")]
    kinds.sort(key=lambda k: k != "dense")  # dense first: it is the baseline of each row
    bandwidth = args.bandwidth if device.type == "cuda" else None  # floors only mean something on a GPU
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; L = {args.labels:,}, D = {args.features}; medians of {args.repeats} runs")
    print(HEADER + "\n|" + "---|" * (HEADER.count("|") - 1))
    for dtype in [getattr(torch, name) for name in args.dtype]:
        for batch in args.batch:
            # inputs need gradients, as an encoder below the classifier does: backward = grad-x + grad-w
            inputs = [torch.randn(batch, args.features, device=device, dtype=dtype, requires_grad=True)
                      for _ in range(args.inputs)]
            dense_total = None
            for fan_in in args.fan_in:
                for kind in kinds:
                    if kind == "dense" and dense_total is not None:
                        continue  # a dense layer does not depend on k: measured once per (dtype, B)
                    layer = make_layer(kind, args.labels, args.features, fan_in, dtype, device)
                    fwd, bwd, peak = measure(layer, inputs, args.repeats)
                    dense_total = fwd + bwd if kind == "dense" else dense_total
                    size = (args.labels, layer_bytes(layer))
                    print(row(kind, dtype, batch, fan_in, fwd, bwd, dense_total, peak, size,
                              bandwidth), flush=True)
                    del layer


if __name__ == "__main__":
    main()
