"""Speed and memory of the fixed fan-in layer against a dense nn.Linear of the same shape.

For every (dtype, batch B, fan-in k) it times forward and backward separately for
  sparse/cuda        - the kernels of kernels.cu as the layer runs them (GPU with cupy only): tiled
                       forward and grad-w, grad-x as a gather over the transposed connectivity,
  sparse/cuda-simple - the simple kernels of kernels.cu (the first, correct-first set),
  sparse/torch       - the pure-PyTorch backend (torch/gG: HASTE's groups of G labels, --group-size),
  dense              - nn.Linear(D, L), the baseline the paper's memory claim is measured against,
  dense-tf32         - the same with TF32 matrix products allowed (GPU, fp32 only),
  dense-pad8         - nn.Linear(D, L rounded up to a multiple of 8): an odd L such as 670,091 keeps
                       cuBLAS off its fastest 16-bit kernels, so this is the fair 16-bit baseline,
and prints medians over several input sets, the layer's own bytes, and for the sparse layer the
achieved DRAM bandwidth and the ratio of each pass to its floor: bytes = L*k*(s+4) + B*L*s per
pass (s bytes a value, int32 indices). Each pass is timed alone, or with --throughput, many steps
back to back. Every layer is first checked against its dense float64 equivalent (check_step).

    python bench.py                                # GPU: Amazon-670K shape; CPU: a 1-minute size
    python bench.py --labels 100000 --batch 128 --fan-in 32 --dtype float32
    python bench.py --step                         # whole training steps: forward, loss, backward, AdamW
    python bench.py --rewire                       # time one SET rewire (dst.rewire) of the whole layer
    python bench.py --memory --data amazon670k     # a whole run's peak memory, phase by phase (memory.py)
    ncu --kernel-name regex:tiled python bench.py --profile --batch 128 --fan-in 32 --layers cuda

Data at the paper's scale (load, clusters, token caches, resident memory) is tools/rehearse.py's."""
import argparse
import contextlib
import functools
import re
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import dst
import grouped
import memory
import model
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
    kinds = ["cuda", "cuda-simple", "torch", "dense", "dense-tf32", "dense-pad8"]
    p.add_argument("--layers", nargs="+", default=kinds, choices=kinds)
    p.add_argument("--group-size", type=int, nargs="+", default=[1], help="HASTE's groups of G labels (torch/gG)")
    p.add_argument("--throughput", action="store_true", help="time steps back to back, not one call at a time")
    p.add_argument("--repeats", type=int, default=20 if gpu else 3, help="timed runs (median reported)")
    p.add_argument("--inputs", type=int, default=3, help="distinct random input sets cycled through")
    p.add_argument("--rewire", action="store_true", help="time dst.rewire (fraction 0.2, AdamW state) instead")
    p.add_argument("--step", action="store_true", help="time whole training steps (loss, backward, AdamW) instead")
    p.add_argument("--loss", nargs="+", default=["lean", "plain", "none"], choices=["lean", "plain", "none"])
    p.add_argument("--layout", nargs="+", default=["contiguous", "transposed"], choices=["contiguous", "transposed"])
    p.add_argument("--profile", action="store_true", help="one warm-up and one timed step only, for a profiler")
    p.add_argument("--memory", action="store_true", help="a whole run's memory by phase, of the presets --data")
    p.add_argument("--data", nargs="+", default=["amazon670k"], help="--memory: paper presets (memory.py)")
    p.add_argument("--label-fraction", type=float, default=1.0, help="--memory: count at this and half of it")
    p.add_argument("--bandwidth", type=float, help="GPU DRAM GB/s for the floor ratios (default: copy_bandwidth)")
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


def copy_bandwidth(device, gigabytes=2):
    """GB/s of a device-to-device copy, bytes read plus bytes written: the DRAM ceiling in practice."""
    source = torch.empty(gigabytes * 2**30 // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    with Timer(device) as t:
        for _ in range(10):
            target.copy_(source)
    return 10 * 2 * source.numel() * 4 / t.ms / 1e6


def make_layer(kind, labels, features, fan_in, dtype, device):
    with device:  # built where it runs: drawing 670k random index rows on the host takes seconds
        if kind.startswith("dense"):
            return nn.Linear(features, -(-labels // 8) * 8 if kind == "dense-pad8" else labels, dtype=dtype)
        backend, _, group = kind.partition("/g")  # "torch/g16": groups of 16 labels sharing index rows
        # the layout the project's model runs (a transposed view); bench_step also times the other
        return FixedFanInLinear(features, labels, fan_in, backend=backend, contiguous_output=False,
                                group_size=int(group or 1)).to(dtype)


def layer_kinds(args, device, dtype):
    """The layer kinds of args.layers that can run here, dense first (the baseline of each row)."""
    gpu_kernels = device.type == "cuda" and sparse_layer.cupy_available()
    kinds = [k for k in args.layers if (gpu_kernels or not k.startswith("cuda"))
             and (device.type == "cuda" or k not in ("dense-tf32", "dense-pad8"))
             and (dtype == torch.float32 or k != "dense-tf32")]
    kinds += [f"torch/g{g}" for g in args.group_size if g > 1 and "torch" in kinds]
    return sorted(kinds, key=lambda k: not k.startswith("dense"))


@contextlib.contextmanager
def tf32(kind):
    """Allow TF32 matrix products inside the block for dense-tf32 (fp32 inputs, 10-bit mantissas)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = saved or kind == "dense-tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def report_failure(kind):
    """A sparse layer that fails (an error, or a wrong result in check_step) prints one line and
    lets the other rows run: on a lent GPU, one broken kernel set must not cost the others' numbers."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 (reported, not hidden)
        if kind.startswith("dense"):
            raise
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        print(f"| sparse/{kind} | FAILED: {type(error).__name__}: {first_line} |", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the failed layer held goes back before the next one


def measure(layer, inputs, repeats, throughput=False):
    """Median forward and backward ms of one call at a time; with `throughput`, the mean over
    `repeats` steps run back to back (forward alone, then forward + backward; backward = the
    difference), where the host prepares the next call while the GPU runs the last."""
    device = inputs[0].device
    with torch.no_grad():  # output gradients in the layout of the output, as a loss computed from it gives
        grads = [torch.randn_like(layer(x)) for x in inputs]
    warmup = 1 if repeats == 1 else 2  # warm-up steps: kernel compilation, allocator caches
    if throughput:
        for step in range(warmup):
            layer(inputs[0]).backward(grads[0])
        with Timer(device) as f:
            for step in range(repeats):
                layer(inputs[step % len(inputs)])
        with Timer(device) as t:
            for step in range(repeats):
                layer(inputs[step % len(inputs)]).backward(grads[step % len(grads)])
        return f.ms / repeats, (t.ms - f.ms) / repeats
    forward, backward = [], []
    for step in range(repeats + warmup):
        x, grad = inputs[step % len(inputs)], grads[step % len(grads)]
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with Timer(device) as f:
            y = layer(x)
        with Timer(device) as b:
            y.backward(grad)
        if step >= warmup:
            forward.append(f.ms)
            backward.append(b.ms)
        del y
    return statistics.median(forward), statistics.median(backward)


def floor_bytes(labels, fan_in, batch, value_bytes):
    """DRAM bytes one pass must move at least: weights + indices once, activations of every label."""
    return labels * fan_in * (value_bytes + 4) + batch * labels * value_bytes


HEADER = ("| layer | dtype | B | k | forward ms | backward ms | total ms | vs dense | vs dense-pad8 | "
          "layer MB | fwd GB/s | fwd / floor | bwd / floor |")


def row(kind, dtype, batch, fan_in, fwd, bwd, baselines, size, bandwidth):
    sparse = not kind.startswith("dense")
    floor = floor_bytes(size[0], fan_in, batch, dtype.itemsize) if sparse else None
    speedup = lambda base: f"{baselines[base] / (fwd + bwd):.2f}x" if base in baselines else "-"
    cells = [kind if not sparse else f"sparse/{kind}", str(dtype).removeprefix("torch."), batch,
             fan_in if sparse else "-", f"{fwd:.2f}", f"{bwd:.2f}", f"{fwd + bwd:.2f}",
             speedup("dense"), speedup("dense-pad8"), f"{size[1] / 2**20:.0f}",
             f"{floor / fwd / 1e6:.0f}" if sparse else "-",
             f"{fwd / (floor / bandwidth / 1e6):.1f}" if sparse and bandwidth else "-",
             f"{bwd / (2 * floor / bandwidth / 1e6):.1f}" if sparse and bandwidth else "-"]
    return "| " + " | ".join(map(str, cells)) + " |"


def bench_rewire(args, device):
    """One SET step (dst.rewire, fraction 0.2) over the whole layer with AdamW state: as the release
    rewires (global pruning, state kept), and per row with the regrown slots' state reset. The time
    includes the rebuild of the transposed connectivity that the next backward pass needs."""
    kind = "cuda" if device.type == "cuda" and sparse_layer.cupy_available() else "torch"
    print("| L | D | k | layer | rewiring | connections rewired | rewire ms (median) |\n|---|---|---|---|---|---|---|")
    for fan_in in args.fan_in:
        layer = make_layer(kind, args.labels, args.features, fan_in, torch.float32, device)
        optimizer = torch.optim.AdamW(layer.parameters())
        layer(torch.randn(2, args.features, device=device, requires_grad=True)).sum().backward()
        optimizer.step()  # creates the exp_avg / exp_avg_sq state that a reset must zero
        ops = sparse_layer._resolve_backend(kind, torch.empty(0, device=device))
        for mode in (dict(scope="global"), dict(scope="row", reset_state=True)):
            times = []
            for step in range(args.repeats + 1):  # one warm-up
                with Timer(device) as t:
                    stats = dst.rewire(layer, optimizer, fraction=0.2, **mode)
                    layer(torch.randn(2, args.features, device=device))  # notices the new indices
                    sparse_layer.transpose_connectivity(layer.indices.int(), layer.in_features,  # what the next
                                                        ops.labels_per_chunk(layer.indices.device))  # backward builds
                times.append(t.ms)
            x = torch.randn(8, args.features, device=device)  # the rewired layer still computes its dense equivalent
            check_step(layer, x, *(t.to(device) for t in random_positives(8, args.labels, 5, torch.Generator())))
            described = ", ".join(f"{k} {v}" for k, v in mode.items())
            print(f"| {args.labels:,} | {args.features} | {fan_in} | sparse/{kind} | {described} | "
                  f"{stats['rewired']:,} | {statistics.median(times[1:]):.1f} |", flush=True)


def random_positives(batch, num_labels, per_document, generator):
    """(rows, labels) of `per_document` distinct random positive labels for each of `batch` documents."""
    labels = torch.stack([torch.randperm(num_labels, generator=generator)[:per_document] for _ in range(batch)])
    return torch.arange(batch).repeat_interleave(per_document), labels.flatten()


def plain_squared_hinge(scores, target):
    """What a user writes: the squared hinge by autograd from a dense 0/1 target, elementwise on [B, L]."""
    return torch.relu(1 - (2 * target - 1) * scores).square().mean()


def check_step(layer, x, rows, labels):
    """A layer's loss and gradients (input, weight, bias) in one training step against its dense
    float64 equivalent on the same input: a fast but wrong layer must not post a time."""
    weight = layer.to_dense() if isinstance(layer, FixedFanInLinear) else layer.weight
    x64 = x.detach().double().requires_grad_()
    w64, b64 = weight.detach().double().requires_grad_(), layer.bias.detach().double().requires_grad_()
    scores = x64 @ w64.T + b64
    target = torch.zeros_like(scores)
    target[rows, labels] = 1.0
    expected = plain_squared_hinge(scores, target)  # the squared hinge, densely, in float64
    expected.backward()
    x_ = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    loss = model.squared_hinge(layer(x_), rows, labels)
    loss.backward()
    grad_w = w64.grad.gather(1, grouped.expand_to_labels(layer.indices.long(), layer.group_size, len(w64))
                             ) if isinstance(layer, FixedFanInLinear) else w64.grad
    tolerance = 1e-4 if x.dtype == torch.float32 else 3e-2
    for name, got, want in (("loss", loss, expected), ("grad x", x_.grad, x64.grad),
                            ("grad weight", layer.weight.grad, grad_w), ("grad bias", layer.bias.grad, b64.grad)):
        want = want.detach()
        torch.testing.assert_close(got.detach().double(), want, rtol=tolerance, atol=tolerance * float(want.abs().max()),
                                   msg=lambda m: f"{name}: {m}")


def step_losses(rows, labels, target):
    """loss name -> a function of the scores that runs the loss's backward: `lean` (model.py's, from
    the positives), `plain` (plain_squared_hinge), `none` (the layer alone: a fixed output gradient
    in the output's layout)."""
    gradients = {}

    def none(scores):
        key = scores.stride()
        if key not in gradients:
            gradients[key] = torch.randn_like(scores)  # randn_like keeps the layout (strides)
        scores.backward(gradients[key])
    return {"lean": lambda scores: model.squared_hinge(scores, rows, labels).backward(),
            "plain": lambda scores: plain_squared_hinge(scores, target).backward(), "none": none}


def training_step(layer, optimizer, x, run_loss):
    optimizer.zero_grad(set_to_none=True)
    x.grad = None
    run_loss(layer(x))
    optimizer.step()


def resident_kb(field):
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def step_peak_bytes(step, layer, optimizer, x):
    """Peak memory of one training step: everything it holds (weights, their gradients, indices
    and their transposed copy, AdamW state, logits, the loss's buffers), the input batch excepted.
    GPU: the allocator's peak. CPU: the tensors held between steps, plus how far resident memory
    rose during the step (Linux: VmHWM, reset first through /proc/self/clear_refs); memory the
    C library kept from earlier steps and reuses does not show, so this can only underestimate."""
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - x.numel() * x.element_size()
    kept = [*layer.parameters(), *layer.buffers(), *[t for state in optimizer.state.values()
                                                     for t in state.values() if torch.is_tensor(t)]]
    kept += [t for copy in getattr(layer, "_transposed", {}).values() if copy for t in copy]
    if not Path("/proc/self/clear_refs").exists():
        return None  # not Linux: no resident-memory peak to read
    before = resident_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    step()
    return sum(t.numel() * t.element_size() for t in kept) + (resident_kb("VmHWM") - before) * 1024


def bench_step(args, device):
    """A whole training step of the classifier: forward, a loss (--loss: `lean`, model.py's squared
    hinge from the list of positives, 5 a document; `plain`, the same loss written by autograd on a
    dense 0/1 target, as in a user's own model; `none`, the layer alone), backward (input and
    weights), AdamW step; the sparse layer with its output contiguous (as nn.Linear's) or as a
    transposed view (--layout). Every layer is first checked against its dense float64 equivalent
    (check_step), then timed; then the peak memory of one more step (step_peak_bytes). Last, per
    fan-in, the plain loss's bound: (dense + plain loss alone) / (sparse + plain loss alone), the
    speed-up a plain loss leaves possible, beside the one measured."""
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}")
    print("| L | D | B | dtype | layer | k | output | loss | step ms (median) | vs dense, same loss | step peak MB |\n"
          + "|---" * 11 + "|")
    generator = torch.Generator().manual_seed(0)
    for dtype in [getattr(torch, name) for name in args.dtype]:
        for batch in args.batch:
            x = torch.randn(batch, args.features, dtype=dtype, generator=generator).to(device).requires_grad_()
            rows, labels = (t.to(device) for t in random_positives(batch, args.labels, 5, generator))
            target = torch.zeros(batch, args.labels, dtype=dtype, device=device)
            target[rows, labels] = 1
            losses = step_losses(rows, labels, target)
            times = {}  # (kind, k, layout, loss) -> ms
            for kind, fan_in in [(k, f) for f in args.fan_in for k in layer_kinds(args, device, dtype)
                                 if not k.startswith("dense") or f == args.fan_in[0]]:
                layouts = ["contiguous"] if kind.startswith("dense") else args.layout
                for layout, loss in [(layout, loss) for layout in layouts for loss in args.loss]:
                    with report_failure(kind):
                        ms, peak = time_step(args, kind, fan_in, dtype, device, x, (rows, labels), layout,
                                             losses[loss])
                        times[kind, fan_in, layout, loss] = ms
                        dense = times.get(("dense", args.fan_in[0], "contiguous", loss))
                        print(f"| {args.labels:,} | {args.features} | {batch} | {str(dtype).removeprefix('torch.')} | "
                              f"{kind if kind.startswith('dense') else 'sparse/' + kind} | "
                              f"{'-' if kind.startswith('dense') else fan_in} | {layout} | {loss} | {ms:.1f} | "
                              f"{f'{dense / ms:.2f}x' if dense else '-'} | {'-' if peak is None else f'{peak / 2**20:.0f}'} |",
                              flush=True)
            plain_bound(args, device, times, target)


def plain_bound(args, device, times, target):
    """The plain loss's bound per sparse layer: the step can at best save what the layer saves, the
    plain loss itself (fwd + bwd on a contiguous [B, L] tensor, timed here) costing the same."""
    if "plain" not in args.loss or "none" not in args.loss:
        return
    scores = torch.randn_like(target).requires_grad_()
    loss_ms = []
    for _ in range(args.repeats + 1):
        with Timer(device) as t:
            plain_squared_hinge(scores, target).backward()
        loss_ms.append(t.ms)
    loss_ms = statistics.median(loss_ms[1:])
    dense = times.get(("dense", args.fan_in[0], "contiguous", "none"))
    dense_plain = times.get(("dense", args.fan_in[0], "contiguous", "plain"))
    print(f"\nplain loss alone (fwd + bwd on a contiguous [B, L]): {loss_ms:.1f} ms")
    for (kind, fan_in, layout, loss), ms in times.items():
        plain = times.get((kind, fan_in, layout, "plain"))
        if kind.startswith("dense") or loss != "none" or None in (dense, dense_plain, plain):
            continue
        bound, measured = (dense + loss_ms) / (ms + loss_ms), dense_plain / plain
        print(f"sparse/{kind} k={fan_in} {layout}: plain-loss step {measured:.2f}x dense, bound {bound:.2f}x "
              f"({100 * measured / bound:.0f}% of it)", flush=True)


def time_step(args, kind, fan_in, dtype, device, x, positives, layout, run_loss):
    """(median ms, peak bytes) of the training step of one layer, checked first."""
    layer = make_layer(kind, args.labels, args.features, fan_in, dtype, device)
    if isinstance(layer, FixedFanInLinear):
        layer.contiguous_output = layout == "contiguous"
    check_step(layer, x, *positives)  # in full fp32 also for dense-tf32: cuBLAS's TF32 is not ours to test
    with tf32(kind):
        optimizer = torch.optim.AdamW(layer.parameters())
        step = functools.partial(training_step, layer, optimizer, x, run_loss)
        times = []
        for _ in range(args.repeats + 1):  # one warm-up step, which also creates the AdamW state
            with Timer(device) as t:
                step()
            times.append(t.ms)
        peak = step_peak_bytes(step, layer, optimizer, x)
    return statistics.median(times[1:]), peak


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.rewire:
        return bench_rewire(args, device)
    if args.step:
        return bench_step(args, device)
    if args.memory:
        return memory.print_table(args.data, device, args.label_fraction)
    if args.profile:
        args.repeats, args.inputs = 1, 1
    bandwidth = None  # floors only mean something on a GPU
    if device.type == "cuda":
        bandwidth = args.bandwidth or copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    mode = f"{args.repeats} calls back to back, mean" if args.throughput else f"one call at a time, median of {args.repeats}"
    floors = f"; DRAM floors at {bandwidth:.0f} GB/s" if bandwidth else ""
    print(f"device: {name}; L = {args.labels:,}, D = {args.features}; {mode}{floors}")
    print(HEADER + "\n|" + "---|" * (HEADER.count("|") - 1))
    for dtype in [getattr(torch, name) for name in args.dtype]:
        for batch in args.batch:
            # inputs need gradients, as an encoder below the classifier does: backward = grad-x + grad-w
            inputs = [torch.randn(batch, args.features, device=device, dtype=dtype, requires_grad=True)
                      for _ in range(args.inputs)]
            baselines = {}  # total ms of each dense kind: a dense layer does not depend on k
            for fan_in in args.fan_in:
                for kind in layer_kinds(args, device, dtype):
                    if kind in baselines:
                        continue
                    with report_failure(kind):
                        fwd, bwd, size = time_layer(args, kind, fan_in, dtype, device, inputs)
                        if kind.startswith("dense"):
                            baselines[kind] = fwd + bwd
                        print(row(kind, dtype, batch, fan_in, fwd, bwd, baselines, (args.labels, size), bandwidth),
                              flush=True)


def time_layer(args, kind, fan_in, dtype, device, inputs):
    """(forward ms, backward ms, bytes) of one layer kind, checked first (in full fp32 also for
    dense-tf32: cuBLAS's TF32 is not ours to test)."""
    layer = make_layer(kind, args.labels, args.features, fan_in, dtype, device)
    rows, labels = (t.to(device) for t in random_positives(len(inputs[0]), args.labels, 5, torch.Generator()))
    check_step(layer, inputs[0], rows, labels)
    with tf32(kind):
        held = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
        return (*measure(layer, inputs, args.repeats, args.throughput), held)


if __name__ == "__main__":
    main()
