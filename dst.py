"""Dynamic sparse training of the fixed fan-in layer by SET (paper, Section 3, "Dynamic sparse training").

Sparse Evolutionary Training (Mocanu et al. 2018) lets every label find the input features that
matter to it. Every `interval` steps, in every row of the layer:
  1. prune   - drop the connections of smallest |weight|: a fixed fraction of the row, or every
               weight below a threshold (at most a capped fraction of the row);
  2. regrow  - connect as many new inputs, drawn uniformly at random among those the row does
               not use, with weight zero, so the fan-in stays exactly k and no index repeats;
  3. reset   - zero the optimizer state (Adam moments, SGD momentum) of the regrown slots, so no
               stale momentum of the pruned weight flows into the new connection.
How much is rewired decays by a cosine to zero at `end` (a fraction of training): RewireSchedule.

DST acts on a FixedFanInLinear and its optimizer only; it knows nothing of models or data.
"""
import math
from dataclasses import dataclass

import torch

# The regrowth draws a [rows, D] random matrix this many elements at a time, by device type: 16 MB
# on the CPU; 512 MB on a GPU, where every chunk costs launches and a host sync (nonzero).
ROW_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 27}


def prune_counts(weight, fraction=None, threshold=None, max_fraction=None, free_inputs=None):
    """How many connections to prune in each row: [L] int64.

    fraction mode:  floor(fraction * k) in every row;
    threshold mode: the weights with |w| < threshold, at most floor(max_fraction * k) per row.
    Never more than the row has free inputs to regrow into (D - k).
    """
    fan_in = weight.shape[1]
    if (fraction is None) == (threshold is None):
        raise ValueError("give exactly one of fraction (fraction mode) or threshold (threshold mode)")
    if fraction is not None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        counts = torch.full(weight.shape[:1], math.floor(fraction * fan_in), dtype=torch.int64, device=weight.device)
    else:
        if max_fraction is None or not 0 <= max_fraction <= 1:
            raise ValueError(f"threshold mode needs max_fraction in [0, 1], got {max_fraction}")
        below = (weight.abs() < threshold).sum(dim=1)
        counts = below.clamp(max=math.floor(max_fraction * fan_in))
    return counts if free_inputs is None else counts.clamp(max=free_inputs)


def sample_unused(indices, count, in_features, generator=None):
    """[rows, count] distinct input ids per row, uniformly at random among those not in the row.

    Random scores for all D inputs, the row's own inputs pushed below every other score, top-k:
    a uniform random subset of the unused inputs (count <= D - k is the caller's promise).
    """
    scores = torch.rand(indices.shape[0], in_features, generator=generator, device=indices.device)
    scores.scatter_(1, indices.long(), -1.0)
    return scores.topk(count, dim=1).indices


@torch.no_grad()
def rewire(layer, optimizer=None, fraction=None, threshold=None, max_fraction=None,
           generator=None, previous_regrown=None):
    """One SET step on a FixedFanInLinear, vectorised over rows. Returns statistics:

    rewired:   how many connections were pruned and regrown;
    regrown:   [L, k] bool mask of the regrown slots (pass it back as `previous_regrown`);
    survived:  the fraction of the slots regrown by the previous step still alive (None if unknown).
    """
    weight, indices = layer.weight, layer.indices
    num_labels, fan_in = weight.shape
    counts = prune_counts(weight, fraction, threshold, max_fraction, free_inputs=layer.in_features - fan_in)
    regrown = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    most = int(counts.max()) if num_labels else 0
    if most > 0:
        step = max(1, ROW_CHUNK_ELEMENTS.get(weight.device.type, ROW_CHUNK_ELEMENTS["cpu"]) // layer.in_features)
        for start in range(0, num_labels, step):
            rows = slice(start, min(start + step, num_labels))
            _rewire_rows(weight, indices, regrown, rows, counts[rows], most, layer.in_features, generator)
        if optimizer is not None:
            reset_optimizer_state(optimizer, weight, regrown)
    survived = None
    if previous_regrown is not None and previous_regrown.any():
        survived = float((previous_regrown & ~regrown).sum() / previous_regrown.sum())
    return {"rewired": int(regrown.sum()), "regrown": regrown, "survived": survived}


def _rewire_rows(weight, indices, regrown, rows, counts, most, in_features, generator):
    # Prune: slots in ascending |weight|; a stable sort breaks ties by slot position, so the
    # choice is the same on every run and every device.
    slots = weight[rows].abs().argsort(dim=1, stable=True)[:, :most]  # [c, most]
    # Regrow: candidates for every row, of which row l takes its first counts[l].
    new_inputs = sample_unused(indices[rows], most, in_features, generator)  # [c, most]
    take = torch.arange(most, device=weight.device) < counts[:, None]
    row, rank = take.nonzero(as_tuple=True)
    slot = slots[row, rank]
    row = row + rows.start
    indices[row, slot] = new_inputs[row - rows.start, rank].to(indices.dtype)
    weight[row, slot] = 0.0
    regrown[row, slot] = True


def reset_optimizer_state(optimizer, weight, slots):
    """Zero every per-weight state tensor of `weight` (Adam's exp_avg, exp_avg_sq, max_exp_avg_sq,
    SGD's momentum_buffer, ...) at the given [L, k] boolean slots; scalars such as `step` stay."""
    for value in optimizer.state.get(weight, {}).values():
        if torch.is_tensor(value) and value.shape == weight.shape:
            value[slots] = 0


@dataclass
class RewireSchedule:
    """When to rewire and how much (paper defaults for Amazon-670K).

    Rewire every `interval` steps while step < end * total_steps. The amount rewired, the fraction
    (fraction mode) or the threshold (threshold mode), decays by a cosine from its initial value
    at step 0 to zero at end * total_steps; in threshold mode `fraction` caps each row.
    """
    total_steps: int
    interval: int = 800
    end: float = 0.66
    fraction: float = 0.2
    threshold: float | None = None

    def __post_init__(self):
        if self.interval < 1 or self.total_steps < 0 or not 0 <= self.end <= 1:
            raise ValueError(f"need interval >= 1, total_steps >= 0 and end in [0, 1], got {self}")

    @property
    def last_step(self):
        return self.end * self.total_steps

    def due(self, step):
        return step > 0 and step % self.interval == 0 and step < self.last_step

    def decay(self, step):
        """Cosine from 1 at step 0 to 0 at the end of rewiring."""
        if step >= self.last_step:
            return 0.0
        return 0.5 * (1 + math.cos(math.pi * step / self.last_step))

    def arguments(self, step):
        """Keyword arguments of rewire() at this step."""
        if self.threshold is None:
            return {"fraction": self.fraction * self.decay(step)}
        return {"threshold": self.threshold * self.decay(step), "max_fraction": self.fraction}
