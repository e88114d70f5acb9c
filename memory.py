"""The memory of a whole training run of a paper preset, phase by phase (`bench.py --memory`): the
paper's claim is a small memory footprint, and this is where it is measured.

A run of the preset as train.py would make it, with the preset's shapes, batch and precision, but
no data or download: the encoder built from its architecture's config with random weights, a few
generated batches of full-length documents at the preset's label count L. Phases: the state held
before training, the first step (no optimizer state yet), a steady step, a step that rewires and
the rewire inside it, the step after it (it rebuilds the slots by input feature), an evaluation
batch and a checkpoint save.

On a GPU each phase's figure is torch.cuda.max_memory_allocated. On the CPU it is counted:
`Counter` follows every tensor storage an aten op creates, from its creation until it is freed,
which is what the CUDA allocator's statistic counts (less its rounding to 512 bytes), under CPU
autocast in 16 bit (bfloat16 standing in for fp16: the same bytes). The classifier is computed by
the `cuda` backend's own code with its kernels' work done by the torch backend uncounted
(`emulated_cuda_ops`), so the count holds what CUDA would allocate; the one library call whose
GPU scratch it cannot see, torch.sort (the rebuild of the slots by input feature), gets cub's
documented buffers added. Two ops that a GPU computes another way are counted as it computes them
(their CPU values kept): attention as a fused kernel, which never builds the CPU math path's
[B, H, T, T] matrices (`fused_attention`), and dropout with a one-byte mask (`fused_dropout`).
Not seen either way: the CUDA context and cuBLAS workspaces, the fused attention kernels' own
scratch, and memory the allocator caches (outside max_memory_allocated too).

    python bench.py --memory --data amazon670k                          # the full shape
    python bench.py --memory --data amazon3m --label-fraction 0.25      # counted at L/4 and L/8, extrapolated
    python bench.py --memory --data amazon670k "amazon670k --group-size 32"  # a preset and flags (HASTE's groups)
"""
import contextlib
import dataclasses
import math
import tempfile
import weakref
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import checkpoint
import config as configuration
import cuda_launch
import data
import dst
import evaluate
import grouped
import model
import sparse_layer
import train

LABELS = {"wiki10-31k": 30_938, "wiki500k": 501_070, "amazon670k": 670_091, "amazon3m": 2_812_281,
          "lf-amazontitles-131k": 131_073, "lf-wikiseealso-320k": 312_330}
H200 = (132, 227 * 1024, 228 * 1024)  # multiprocessors, shared bytes a block may have, per multiprocessor
GiB = 2**30


def encoder_config(name):
    """The architecture of a preset's encoder, from transformers' defaults (no download)."""
    import transformers
    if name == configuration.BERT:
        return transformers.BertConfig()  # bert-base-uncased
    if name == configuration.DISTILBERT:
        return transformers.DistilBertConfig()  # distilbert-base
    return transformers.RobertaConfig(num_hidden_layers=6, vocab_size=50_265, max_position_embeddings=514,
                                      type_vocab_size=1, layer_norm_eps=1e-5)  # distilroberta-base


class Counter(TorchDispatchMode):
    """Live bytes of the storages aten ops created (each counted once, views included), and their
    peak. `sort_scratch`: add the buffers CUDA's stable sort takes beside its outputs (an int64 iota
    and cub's alternate key and value buffers)."""

    def __init__(self, sort_scratch=False):
        super().__init__()
        self.sizes, self.live, self.peak, self.paused, self.sort_scratch = {}, 0, 0, 0, sort_scratch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self.track(tensor)
            if self.sort_scratch and func.overloadpacket is torch.ops.aten.sort:
                keys = args[0]
                self.peak = max(self.peak, self.live + keys.numel() * (8 + keys.element_size() + 8))
        return out

    def track(self, tensor):
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size and key not in self.sizes:
            self.sizes[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self.free, key)

    def free(self, key):
        self.live -= self.sizes.pop(key)

    @contextlib.contextmanager
    def pause(self):
        """What runs here is not counted (and what it creates never is)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def emulated_cuda_ops(counter):
    """The `cuda` backend on CPU tensors: CudaOps' own allocations (outputs, the gather's partial
    sums, fp32 buffers) at an H200's launch geometry, with the values the kernels would write
    computed by the torch backend, uncounted."""
    torch_ops = sparse_layer.TorchOps

    class EmulatedCudaOps(cuda_launch.CudaOps):
        launch = staticmethod(lambda *args: None)
        limits = staticmethod(lambda device: H200)

        @classmethod
        def forward(cls, xT, weight, indices, bias):
            yT = super().forward(xT, weight, indices, bias)
            with counter.pause():
                return yT.copy_(torch_ops.forward(xT, weight, indices, bias))

        @classmethod
        def grad_input(cls, grad_yT, weight, indices, in_features, by_input, into=None):
            with counter.pause():  # `into` as it was, to add the torch backend's values to
                before = None if into is None else into.clone()
            grad_xT = super().grad_input(grad_yT, weight, indices, in_features, by_input, into)
            with counter.pause():
                return grad_xT.copy_(torch_ops.grad_input(grad_yT, weight, indices, in_features, by_input, before))

        @classmethod
        def grad_weight(cls, grad_yT, xT, indices):
            grad_weight = super().grad_weight(grad_yT, xT, indices)
            with counter.pause():
                return grad_weight.copy_(torch_ops.grad_weight(grad_yT, xT, indices))

    return EmulatedCudaOps


def fused_attention(counter):
    """scaled_dot_product_attention as a GPU computes it, counted: a GPU runs a fused kernel (flash
    or memory-efficient attention in 16 bit) that keeps its inputs, output and an fp32 log-sum-exp
    [B, H, T] for the backward pass, and there makes the three input gradients and an fp32
    accumulator the size of the query. The CPU's math path, run here uncounted for the values,
    would build [B, H, T, T] scores and probabilities instead; the backward pass recomputes it
    under the forward pass's random state (attention dropout)."""
    math_path = torch.nn.functional.scaled_dot_product_attention

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value, options):
            ctx.options, ctx.random_state = options, torch.get_rng_state()
            with counter.pause():
                output = math_path(query, key, value, **options)
            counter.track(output)
            ctx.save_for_backward(query, key, value, output, query.new_empty(query.shape[:-1], dtype=torch.float32))
            return output

        @staticmethod
        def backward(ctx, grad_output):
            query, key, value, *_ = ctx.saved_tensors  # (read once: checkpointing recomputes them)
            accumulator = torch.empty_like(query, dtype=torch.float32)  # counted while the gradients are made
            with counter.pause(), torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.set_rng_state(ctx.random_state)
                inputs = [t.detach().requires_grad_() for t in (query, key, value)]
                grads = torch.autograd.grad(math_path(*inputs, **ctx.options), inputs, grad_output)
            for grad in grads:
                counter.track(grad)
            del accumulator
            return (*grads, None)

    return lambda query, key, value, **options: FusedAttention.apply(query, key, value, options)


def fused_dropout(input, p=0.5, training=True, inplace=False):
    """F.dropout as a GPU computes it: its fused kernel keeps a one-byte mask for the backward pass,
    where the CPU's keeps a noise tensor in the input's dtype."""
    return torch.native_dropout(input, p, training)[0] if training and 0 < p < 1 else input


def generated(config, labels, documents, seed=0):
    """An XMCData of `documents` documents with 5 random labels each (no texts: the batches carry
    their tokens), and its clusters when the preset has the aux loss."""
    rng = np.random.default_rng(seed)
    label_ids = np.sort(rng.integers(0, labels, (documents, 5)), axis=1).astype(np.int32).ravel()
    split = data.Split(np.arange(documents + 1, dtype=np.int64) * 5, label_ids)
    xmc = data.XMCData(name="generated", train=split, test=split, num_labels=labels)
    clusters = None
    if config.aux_weight > 0:  # balanced 2-means halves until max_leaf: a power of two of clusters
        clusters = torch.arange(labels) % 2 ** math.ceil(math.log2(max(1, labels / config.max_leaf)))
    return xmc, clusters


def batch_of(config, vocabulary, labels, size, generator):
    """A batch of `size` documents of max_length tokens (the longest a preset reads), 5 labels each."""
    rows = torch.arange(size).repeat_interleave(5)
    tokens = {"input_ids": torch.randint(1000, vocabulary, (size, config.max_length), generator=generator),
              "attention_mask": torch.ones(size, config.max_length, dtype=torch.long)}
    return data.Batch(rows, torch.randint(0, labels, (5 * size,), generator=generator), size, tokens=tokens)


# The sizes of chunked temporaries by device type (a rewire's rows, the loss's labels, an index
# draw's rows): a count on the CPU takes the GPU's, scaled with the labels when counting at a
# fraction of them, so that those temporaries scale too.
CHUNKED = (dst.ROW_CHUNK_ELEMENTS, model.LOSS_CHUNK_ELEMENTS, sparse_layer.CHUNK_ELEMENTS, grouped.GATHER_ELEMENTS)


def phases(preset, labels, device, folder, fraction=1.0):
    """{phase: peak bytes} of a run of `preset` at `labels` labels (see the module docstring)."""
    config = configuration.parse_config(["--data", *preset.split(), "--out", str(folder / "run")])  # (+ flags)
    model_config = encoder_config(config.encoder)
    import transformers
    transformers.AutoModel.from_config(model_config).save_pretrained(folder / "encoder")
    config = dataclasses.replace(config, encoder=str(folder / "encoder"), device=device.type)
    if device.type == "cuda":  # the allocator's own statistics
        counter, live, peak = contextlib.nullcontext(), torch.cuda.memory_allocated, torch.cuda.max_memory_allocated

        def reset():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
    else:
        counter = Counter(sort_scratch=True)
        live, peak = (lambda: counter.live), (lambda: counter.peak)

        def reset():
            counter.peak = counter.live
    peaks = {}

    def phase(name, work):
        reset()
        result = work()
        peaks[name] = peak()
        return result

    generator = torch.Generator().manual_seed(0)
    per_process = config.batch_size
    batches = [batch_of(config, model_config.vocab_size, labels, per_process, generator).to(device)
               for _ in range(2 * config.grad_accum)]
    xmc, clusters = generated(config, labels, per_process * 4)
    with counter, contextlib.ExitStack() as patches:
        if device.type == "cpu":
            patches.enter_context(as_on_a_gpu(counter, fraction))
        state = train.set_up(config, "generated", xmc, clusters, device)
        state.network.train()  # as train_epoch does: dropout on, and the activations' recomputation
        if device.type == "cpu":  # 16-bit autocast as on a GPU (bfloat16: fp16's bytes, and fast here)
            state.autocast = torch.bfloat16 if config.precision != "fp32" else None
            state.scaler = torch.amp.GradScaler("cpu", init_scale=2**12, enabled=config.precision == "fp16")
            for group in (group for optimizer in state.optimizers for group in optimizer.param_groups):
                group["foreach"] = group["foreach"] is not False and not group.get("fused")  # CUDA's auto: foreach
            for tensor in [*state.network.parameters(), *state.network.buffers()]:
                counter.track(tensor)  # loaded from disk: maybe not through an aten op
        peaks["held before training"] = live()

        def step():  # one optimizer step: grad_accum batches
            for number, batch in enumerate(batches[:config.grad_accum], start=1):
                train.train_step(config, state, batch, device, config.grad_accum, number == config.grad_accum)

        phase("first step", step)
        phase("steady step", step)
        interval, rewire, before_rewire = config.rewire_interval, dst.rewire, []
        state.batches_done = interval - config.grad_accum  # the next step closes at batch `interval`: it rewires
        state.rewire_schedule.last_batch = 1 << 40  # by the schedule's first amount, as early in a run

        def measured_rewire(*args, **kwargs):  # the step up to the rewire, then the rewire alone
            before_rewire.append(peak())
            return phase("rewire", lambda: rewire(*args, **kwargs))

        patches.enter_context(mock.patch.object(dst, "rewire", measured_rewire))
        phase("step with a rewire", step)
        peaks["step with a rewire"] = max(before_rewire + [peaks["rewire"]])
        phase("step after a rewire", step)
        evaluation = [batch_of(config, model_config.vocab_size, labels, config.eval_batch_size, generator).to(device)]
        phase("evaluation batch", lambda: evaluate.predict_top_k(state.network, evaluation, 5, device, state.autocast))
        saved = folder / "checkpoint.pt"
        phase("checkpoint save", lambda: torch.save(checkpoint.checkpoint_state(state, 1, config), saved))
    return {**peaks, **classifier_held(state.network.classifier, state.optimizers[1], state.network.sparse_classifier)}


def classifier_held(layer, optimizer, sparse=None):
    """Bytes a classifier holds between steps, by kind: weights and biases, their optimizer state,
    the indices, and the slots by input feature its sparse part keeps (HASTE's groups keep none)."""
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    held = [t for p in layer.parameters() for t in optimizer.state.get(p, {}).values() if torch.is_tensor(t)]
    kept = [t for copy in getattr(sparse, "_transposed", {}).values() if copy for t in copy]
    return {"classifier: weights, biases": size(layer.parameters()), "classifier: optimizer state": size(held),
            "classifier: indices": size(layer.buffers()), "classifier: slots by input, kept": size(kept)}


@contextlib.contextmanager
def as_on_a_gpu(counter, fraction=1.0):
    """On the CPU, the allocations a GPU run makes: the `cuda` backend's (emulated_cuda_ops), the
    fused attention and dropout, and the GPU's chunk sizes (CHUNKED, scaled by `fraction`)."""
    emulated = emulated_cuda_ops(counter)
    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(sparse_layer, "_resolve_backend", lambda backend, x: emulated))
        patches.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention",
                                                fused_attention(counter)))
        patches.enter_context(mock.patch.object(torch.nn.functional, "dropout", fused_dropout))
        for sizes in CHUNKED:
            patches.enter_context(mock.patch.dict(sizes, cpu=max(1, round(sizes["cuda"] * fraction))))
        yield


def classifier_step_peak(labels, fan_in, batch=128, features=768):
    """The counted peak of bench.py --step's classifier step on a GPU (fp32, the layer's transposed
    view, the lean squared hinge with 5 positives a document, AdamW), less the input batch: the
    figure of the README's H200 table, to check the count against."""
    counter = Counter(sort_scratch=True)
    with counter, as_on_a_gpu(counter):
        layer = sparse_layer.FixedFanInLinear(features, labels, fan_in, contiguous_output=False)
        optimizer = torch.optim.AdamW(layer.parameters(), foreach=True)
        x = torch.randn(batch, features, requires_grad=True)
        rows, positives = torch.arange(batch).repeat_interleave(5), torch.randint(0, labels, (5 * batch,))
        for _ in range(3):  # the last one counted, as bench.py measures a step after its warm-up
            counter.peak = counter.live
            optimizer.zero_grad(set_to_none=True)
            x.grad = None
            model.squared_hinge(layer(x), rows, positives).backward()
            optimizer.step()
    return counter.peak - x.numel() * x.element_size()


def report(preset, device, label_fraction=1.0):
    """The phases of `preset` in GiB: at its L, or counted at label_fraction * L and half of it and
    extrapolated linearly in L (every label-proportional tensor is linear in L)."""
    labels = LABELS[preset.split()[0]]
    with tempfile.TemporaryDirectory() as temporary:
        if label_fraction >= 1:
            return {name: peak / GiB for name, peak in phases(preset, labels, device, Path(temporary)).items()}
        small, smaller = (max(1, round(labels * f)) for f in (label_fraction, label_fraction / 2))
        at_small = phases(preset, small, device, Path(temporary), label_fraction)
        at_smaller = phases(preset, smaller, device, Path(temporary), label_fraction / 2)
    return {name: (at_small[name] + (at_small[name] - at_smaller[name]) / (small - smaller) * (labels - small)) / GiB
            for name in at_small}


def print_table(presets, device, label_fraction=1.0):
    """bench.py --memory: report's phases in GiB, a column per preset."""
    how = "max_memory_allocated" if device.type == "cuda" else "counted on the CPU (memory.py)"
    scale = "" if label_fraction >= 1 else f", at {label_fraction:g} and half of L, extrapolated"
    print(f"peak GiB by phase, {how}{scale}")
    if device.type == "cpu":  # the count against what an H200 measured (README: bench.py --step, L = 670,091)
        for fan_in, measured in ((32, 1400), (128, 2627)):
            counted = classifier_step_peak(670_091, fan_in) / 2**20
            print(f"check: bench.py --step's classifier step, k = {fan_in}: counted {counted:.0f} MiB, "
                  f"{measured} measured on an H200 ({100 * (counted / measured - 1):+.1f}%)", flush=True)
    columns = {preset: report(preset, device, label_fraction) for preset in presets}
    print("| phase | " + " | ".join(f"`{preset}`" for preset in columns) + " |\n|---" + "|---" * len(columns) + "|")
    for name in next(iter(columns.values())):
        print(f"| {name} | " + " | ".join(f"{column[name]:.2f}" for column in columns.values()) + " |", flush=True)
