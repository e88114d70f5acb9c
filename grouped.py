"""Beyond the paper: the group-shared fan-in of HASTE (the same group's next paper, arXiv 2606.01117).

The labels g*G, ..., g*G + G - 1 form group g and all read the same k inputs, indices[g] of an
[ceil(L / G), k] index matrix; each label keeps its own k weights, so weight stays [L, k]:

    y[b, l] = sum_j weight[l, j] * x[b, indices[l // G, j]] + bias[l].

Sharing the row makes a group's scores one small dense product, the gathered inputs x[:, indices[g]]
[B, k] times the group's weights [k, G], and a run of groups one batched matrix product (torch.bmm:
the CPU's BLAS, a GPU's cuBLAS; no kernel of kernels.cu, on every device). Each gathered input row
now serves G labels, where the paper's layer (G = 1, sparse_layer.py) reads it once per label; the
indices shrink G-fold, and no transposed connectivity is kept: grad-x adds each run's gathered
gradient back with index_add_ (on a GPU with atomics, so its sums may round differently each run).
sparse_layer.fixed_fanin_linear comes here for G > 1 whatever its backend.
"""
import torch

# Elements of a run's gathered inputs [groups, k, B]: on the CPU 1 MB, which stays in cache while the
# products read it (a step at L = 100k, D = 768, k = 32, B = 128 on 2 cores, G = 16 and 32: 2^18
# and 2^19 the fastest of 2^16 ... 2^21, 2^21 1.3-1.5x slower). On a GPU 16M: a backward run holds
# the gathered inputs, their gradient and its fp32 copy, 0.1 GiB in bf16 (2^26: a step 0.26 GiB more at
# Amazon-670K: bench.py --memory), in ten runs at Amazon-670K (21k groups of 32, k = 128, B = 64).
GATHER_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}


def runs_of_groups(labels, group_size, fan_in, batch, device):
    """(groups, labels, G) of each run: whole groups, GATHER_ELEMENTS gathered inputs a run, and a
    last partial group (L not a multiple of G) a run of its own, of L mod G labels."""
    whole = labels // group_size
    step = max(1, GATHER_ELEMENTS.get(device.type, GATHER_ELEMENTS["cpu"]) // max(1, fan_in * batch))
    for start in range(0, whole, step):
        stop = min(start + step, whole)
        yield slice(start, stop), slice(start * group_size, stop * group_size), group_size
    if labels % group_size:
        yield slice(whole, whole + 1), slice(whole * group_size, labels), labels % group_size


class GroupedFanIn(torch.autograd.Function):
    """y [B, L] (or its transposed view, `contiguous` False, as _FixedFanIn) of x [B, D]; weight,
    bias in x's dtype. The backward pass gathers each run's inputs again rather than keep them
    ([L/G, k, B] whole). grad_into: as _FixedFanIn's, a second batch's grad-w added into .grad."""

    @staticmethod
    def forward(ctx, x, weight, indices, bias, group_size, contiguous, grad_into):
        xT = x.t().contiguous()  # [D, B]: a group's gathered inputs are whole rows
        ctx.save_for_backward(xT, weight, indices)
        ctx.group_size, ctx.grad_into = group_size, grad_into
        (labels, fan_in), batch = weight.shape, xT.shape[1]
        yT = torch.empty(labels, batch, dtype=x.dtype, device=x.device)
        for groups, rows, size in runs_of_groups(labels, group_size, fan_in, batch, x.device):
            gathered = xT.index_select(0, indices[groups].reshape(-1)).view(-1, fan_in, batch)
            torch.baddbmm(bias[rows].view(-1, size, 1), weight[rows].view(-1, size, fan_in), gathered,
                          out=yT[rows].view(-1, size, batch))  # (written in place: no copy)
        return yT.t().contiguous() if contiguous else yT.t()

    @staticmethod
    def backward(ctx, grad_y):
        xT, weight, indices = ctx.saved_tensors
        needs, (labels, fan_in), (in_features, batch) = ctx.needs_input_grad, weight.shape, xT.shape
        grad_yT = grad_y.t().contiguous()
        acc = torch.promote_types(xT.dtype, torch.float32)
        grad_xT = torch.zeros(in_features, batch, dtype=acc, device=xT.device) if needs[0] else None
        accumulated = ctx.grad_into.grad if needs[1] and ctx.grad_into is not None else None
        grad_weight = torch.empty_like(weight) if needs[1] and accumulated is None else None
        for groups, rows, size in runs_of_groups(labels, ctx.group_size, fan_in, batch, xT.device):
            flat = indices[groups].reshape(-1)
            slope = grad_yT[rows].view(-1, size, batch)  # [groups, G, B]
            if needs[0]:  # each gathered row's gradient, [groups, k, B], added back where it was read
                grad_xT.index_add_(0, flat, torch.bmm(weight[rows].view(-1, size, fan_in).transpose(1, 2),
                                                      slope).view(-1, batch).to(acc))
            if needs[1]:  # [groups, G, k]: the slope times the gathered inputs
                gathered = xT.index_select(0, flat).view(-1, fan_in, batch)
                if accumulated is not None:
                    accumulated[rows] += torch.bmm(slope, gathered.transpose(1, 2)).view(-1, fan_in)
                else:
                    torch.bmm(slope, gathered.transpose(1, 2), out=grad_weight[rows].view(-1, size, fan_in))
        grad_bias = grad_yT.sum(1, dtype=acc).to(grad_yT.dtype) if needs[3] else None
        grad_x = grad_xT.to(xT.dtype).t() if needs[0] else None
        return grad_x, grad_weight, None, grad_bias, None, None, None


def expand_to_labels(rows, group_size, labels):
    """An [L/G, ...] tensor by group as [L, ...] by label: each group's row repeated for its labels."""
    return rows if group_size == 1 else rows.repeat_interleave(group_size, 0)[:labels]


def group_means(values, group_size):
    """[L, ...] values by label as [ceil(L/G), ...] means over each group's labels."""
    labels = len(values)
    group_of = torch.arange(labels, device=values.device) // group_size
    sums = torch.zeros(-(-labels // group_size), *values.shape[1:], dtype=values.dtype, device=values.device)
    sums.index_add_(0, group_of, values)
    sizes = torch.bincount(group_of).to(values.dtype)
    return sums / sizes.view(-1, *[1] * (values.dim() - 1))
