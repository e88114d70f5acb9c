"""Dynamic sparse training of the fixed fan-in layer by SET (paper, Section 3, "Dynamic sparse training").

Sparse Evolutionary Training (Mocanu et al. 2018) lets every label find the input features that
matter to it. One rewire of a FixedFanInLinear (`rewire`):
  1. select   - the connections to prune: those of smallest `pruning_score` (|weight|), a fraction
                of the whole matrix (scope "global", as the official release does) or of every row
                (scope "row"); or every score below a threshold; optionally at most a cap of each row;
  2. regrow   - as many new connections in the same rows, at the inputs of highest
                `regrowth_score` (uniform random) that the row does not use, with weight zero: the
                fan-in stays exactly k in every row, and no row reads an input twice;
  3. optimizer state of the regrown slots - kept (as the release does) or zeroed (reset_state), so
                that no stale momentum of a pruned weight flows into the new connection.
RewireSchedule says when (every `interval` training batches until `last_batch`) and how much: a
constant or cosine-decayed fraction, or a threshold decayed by a cosine to a floor.
Beyond the paper, a layer of HASTE's groups (group_size G > 1: G labels share an index row) is
rewired by row of indices: a shared slot's score is the mean of its G labels' scores, and a regrown
slot starts at zero in all G rows of weights.

`pruning_score` and `regrowth_score` are SET's two rules, each one line: the hooks of a fork that
tries another criterion (README, "Where to hack"). DST acts on a FixedFanInLinear and its optimizer
only; it knows nothing of models or data.
"""
import math
from dataclasses import dataclass

import torch

from grouped import expand_to_labels, group_means

# The regrowth draws a [rows, D] random matrix this many elements at a time, by device type: 16 MB
# on the CPU; 64 MB on a GPU, where every chunk costs launches and a host sync (`int(...max())`),
# and where the chunk's sort and top-k temporaries (about 24 bytes an element) sit beside the model.
ROW_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}
SCOPES = ("global", "row")


def pruning_score(weight, optimizer_state):
    """SET's pruning rule: [L, k] scores, the smallest pruned first; |w| (the paper's and the
    release's). How many each row loses and which both read it. Another criterion is this one line,
    e.g. |w| * |m| from Adam's first moment, optimizer_state["exp_avg"]. The gradients are gone
    when rewire runs (train.py steps the optimizer and sets them to None first): a gradient
    criterion keeps its own copy of them before the step."""
    return weight.abs()


def regrowth_score(layer, rows, generator):
    """SET's regrowth rule: [rows, D] scores, where each row of the slice `rows` regrows at the
    unused inputs of highest score; uniform random (SET). RigL regrows by |dense gradient| here."""
    return torch.rand(rows.stop - rows.start, layer.in_features, generator=generator, device=layer.weight.device)


def prune_counts(scores, fraction=None, threshold=None, scope="global", row_cap=0.0, free_inputs=None):
    """How many connections to prune in each row, by their pruning scores [L, k]: [L] int64.

    fraction, scope "global": the floor(fraction * L * k) smallest scores of the whole matrix;
    fraction, scope "row":    floor(fraction * k) in every row;
    threshold:                every score < threshold.
    Then at most floor(row_cap * k) per row when row_cap > 0, and never more than the row has free
    inputs to regrow into (D - k).
    """
    num_labels, fan_in = scores.shape
    if (fraction is None) == (threshold is None):
        raise ValueError("give exactly one of fraction (fraction mode) or threshold (threshold mode)")
    if scope not in SCOPES or not 0 <= row_cap <= 1 or (fraction is not None and not 0 <= fraction <= 1):
        raise ValueError(f"need scope in {SCOPES}, row_cap and fraction in [0, 1]; "
                         f"got {scope!r}, {row_cap}, {fraction}")
    if threshold is not None:
        counts = (scores < threshold).sum(dim=1)
    elif scope == "row":
        counts = torch.full((num_labels,), math.floor(fraction * fan_in), dtype=torch.int64, device=scores.device)
    else:  # global: how many of the matrix's `total` smallest entries each row holds
        total = math.floor(fraction * num_labels * fan_in)
        cut = -math.inf if total == 0 else kth_smallest(scores, total)  # (none: below any score)
        below, ties = (scores < cut).sum(dim=1), (scores == cut).sum(dim=1)
        # ties at the cut are taken in row-major order, so that exactly `total` entries are chosen
        ties_above = ties.cumsum(0) - ties
        counts = below + (total - below.sum() - ties_above).clamp(min=0).minimum(ties)
    if row_cap > 0:
        counts = counts.clamp(max=math.floor(row_cap * fan_in))
    return counts if free_inputs is None else counts.clamp(max=free_inputs)


def kth_smallest(values, k):
    """The k-th smallest of `values` (k from 1) by radix select on float32's bits: four counting
    passes over chunks, a byte of the answer each, and no copy of the values. A GPU's sort of them
    would take 16 bytes a value more (5.4 GiB at Amazon-3M's 360M slots), and its kthvalue of one
    long row is slow (an H200: 164 ms for Amazon-670K's 21.4M at k = 32)."""
    flat = values.reshape(-1)
    if flat.dtype != torch.float32:
        return flat.kthvalue(k).values
    # float32's bits as int32 keys that compare as the floats, as unsigned numbers: the bits of a
    # negative float flipped but for the sign (sorts them the other way round), then the sign flipped
    flip = lambda bits: torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # its own inverse
    step, prefix = ROW_CHUNK_ELEMENTS.get(flat.device.type, ROW_CHUNK_ELEMENTS["cpu"]), 0
    for shift in (24, 16, 8, 0):  # the answer's bytes, the highest first
        counts = torch.zeros(257, dtype=torch.int64, device=flat.device)
        for chunk in flat.split(step):
            keys = flip(chunk.view(torch.int32)) ^ -2**31
            byte = (keys >> shift) & 255
            if shift < 24:  # keys that do not start with the bytes found so far go to bin 256
                byte.masked_fill_(((keys >> (shift + 8)) & ((1 << (24 - shift)) - 1)) != prefix, 256)
            counts += torch.bincount(byte, minlength=257)
        below = counts[:256].cumsum(0)
        byte_of_kth = int((below < k).sum())
        k -= int(below[byte_of_kth - 1]) if byte_of_kth else 0
        prefix = prefix << 8 | byte_of_kth
    key = torch.tensor(prefix - 2**32 if prefix >= 2**31 else prefix, dtype=torch.int32, device=flat.device)
    return flip(key ^ -2**31).view(torch.float32)


@torch.no_grad()
def rewire(layer, optimizer=None, fraction=None, threshold=None, scope="global", row_cap=0.0, reset_state=False,
           generator=None, previous_regrown=None):
    """One SET step on a FixedFanInLinear (module docstring), vectorised over rows. Returns:

    rewired:   how many connections were pruned and regrown (groups of G > 1 labels: shared slots);
    regrown:   bool mask of the regrown slots, shaped as the indices (pass it back as `previous_regrown`);
    survived:  the fraction of the slots regrown by the previous step still alive (None if unknown).
    """
    weight, indices, in_features, group = layer.weight, layer.indices, layer.in_features, layer.group_size
    if optimizer is not None:
        check_optimizer(optimizer, weight, reset_state)
    score = pruning_score(weight, {} if optimizer is None else optimizer.state.get(weight, {}))
    if group > 1:  # HASTE: a slot its group's G labels share goes by their mean score; rows below are groups
        score = group_means(score, group)
    counts = prune_counts(score, fraction, threshold, scope, row_cap, free_inputs=in_features - layer.fan_in)
    regrown = torch.zeros(indices.shape, dtype=torch.bool, device=weight.device)
    step = max(1, ROW_CHUNK_ELEMENTS.get(weight.device.type, ROW_CHUNK_ELEMENTS["cpu"]) // in_features)
    for start in range(0, len(indices), step):
        rows = slice(start, min(start + step, len(indices)))
        most = int(counts[rows].max())
        if most == 0:
            continue
        # 1. select: the counts[row] slots of smallest score in every row (ties: the lower slot first,
        #    so that the choice is the same on every run and every device)
        rank = score[rows].argsort(dim=1, stable=True).argsort(dim=1)
        pruned = rank < counts[rows, None]
        # 2. regrow: a score for each of the D inputs, the row's own pushed below every other, top-k:
        #    the best unused inputs (prune_counts left enough of them)
        scores = regrowth_score(layer, rows, generator)
        new_inputs = scores.scatter_(1, indices[rows].long(), -math.inf).topk(most, dim=1).indices
        # the n-th pruned slot of a row (in slot order) takes the row's n-th new input
        nth = (pruned.cumsum(dim=1) - 1).clamp(min=0)
        indices[rows] = torch.where(pruned, new_inputs.gather(1, nth).to(indices.dtype), indices[rows])
        labels = slice(start * group, min(rows.stop * group, len(weight)))  # (G = 1: the same rows)
        weight[labels] = weight[labels].masked_fill(expand_to_labels(pruned, group, labels.stop - labels.start), 0.0)
        regrown[rows] = pruned
    if reset_state and optimizer is not None:  # 3. optimizer state: zeroed, or kept
        reset_optimizer_state(optimizer, weight, expand_to_labels(regrown, group, len(weight)))
    survived = None
    if previous_regrown is not None and previous_regrown.any():
        survived = float((previous_regrown & ~regrown).sum() / previous_regrown.sum())
    return {"rewired": int(regrown.sum()), "regrown": regrown, "survived": survived}


def check_optimizer(optimizer, weight, reset_state):
    """Any torch optimizer whose state is per weight (SGD with or without momentum, Adam, AdamW,
    Adagrad, ...) works. Refused in one line: an optimizer that does not hold the layer's weight
    (its regrown slots would never train), and, to reset state, one whose state for the weight is
    not shaped like it (e.g. Adafactor's factored row and column statistics: no slot to zero)."""
    if not any(p is weight for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(f"rewire: the {type(optimizer).__name__} given does not optimize the layer's weight; pass "
                         f"the optimizer that trains the layer (or none)")
    odd = {name: tuple(value.shape) for name, value in optimizer.state.get(weight, {}).items()
           if torch.is_tensor(value) and value.dim() > 0 and value.shape != weight.shape}
    if reset_state and odd:
        raise ValueError(f"rewire: {type(optimizer).__name__} keeps state {odd} for a weight of shape "
                         f"{tuple(weight.shape)}, not one value per weight, so the regrown slots' state cannot be "
                         f"reset; keep it (reset_state=False, the release's choice) or use a per-weight optimizer")


def reset_optimizer_state(optimizer, weight, slots):
    """Zero every per-weight state tensor of `weight` (Adam's exp_avg, exp_avg_sq, max_exp_avg_sq,
    SGD's momentum_buffer, ...) at the given [L, k] boolean slots; scalars such as `step` stay."""
    for value in optimizer.state.get(weight, {}).values():
        if torch.is_tensor(value) and value.shape == weight.shape:
            value[slots] = 0


def packed(mask):
    """A bool tensor as bits, 8 a byte (uint8): how the regrown slots wait for the next rewire's
    survival count, L*k/8 bytes instead of L*k (0.04 GiB instead of 0.34 at Amazon-3M)."""
    bits = torch.cat([mask.flatten(), mask.new_zeros(-mask.numel() % 8)]).view(-1, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(1, dtype=torch.uint8)


def unpacked(bits, shape):
    """The bool tensor of `shape` that `packed` made `bits` of (None stays None, and a bool mask,
    from a checkpoint saved before masks were packed, stays as it is)."""
    if bits is None or bits.dtype == torch.bool:
        return bits
    mask = (bits[:, None] >> torch.arange(8, dtype=torch.uint8, device=bits.device)) & 1
    return mask.flatten()[:math.prod(shape)].view(shape).bool()


@dataclass
class RewireSchedule:
    """When to rewire and how much, in training batches, as the official release counts them.

    A rewire follows the optimizer step of every `interval`-th batch while batch <= last_batch (the
    release: the batches of the first int(0.66 * epochs) epochs). With gradient accumulation, that
    is the step that closes the window holding such a batch. How much: in fraction mode, `fraction`
    constant (the release) or decayed by a cosine to 0 at last_batch; in threshold mode
    (threshold > 0), a threshold decayed by a cosine from `threshold` to `threshold_floor` (the
    release: 1e-4).
    """
    last_batch: int
    interval: int
    fraction: float
    threshold: float  # > 0: threshold mode
    fraction_schedule: str  # "constant" or "cosine"
    threshold_floor: float

    def __post_init__(self):
        if self.interval < 1 or self.last_batch < 0 or self.fraction_schedule not in ("constant", "cosine"):
            raise ValueError(f"need interval >= 1, last_batch >= 0 and a constant or cosine schedule, got {self}")

    def due(self, batch, window=1):
        """After the optimizer step that closes the `window` batches ending with batch number `batch`."""
        return 0 < batch <= self.last_batch and batch // self.interval > (batch - window) // self.interval

    def cosine(self, batch):
        """From 1 at batch 0 to 0 at last_batch."""
        return 0.5 * (1 + math.cos(math.pi * min(batch / max(self.last_batch, 1), 1.0)))

    def amount(self, batch):
        """(fraction, threshold) of rewire() at this batch: one of the two, the other None."""
        if self.threshold > 0:
            return None, self.threshold_floor + (self.threshold - self.threshold_floor) * self.cosine(batch)
        return self.fraction * (self.cosine(batch) if self.fraction_schedule == "cosine" else 1.0), None
