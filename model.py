"""The model (paper, Section 3 and Figure 1): encoder -> (intermediate layer) -> classifier, plus the
auxiliary meta-classifier.

  encoder        a pretrained transformer (the paper: bert-base-uncased; or frozen, its pooled
                 outputs computed once) or a small bag-of-words encoder that trains from scratch;
  intermediate   optional dense layer W (e.g. 4096 wide): a sparse classifier passes little
                 gradient back to the encoder, a wide dense layer in between restores it. Linear
                 (as in the release) unless an activation is asked for; its output is cast to
                 float32, so the classifier computes in float32 under mixed precision;
  classifier     FixedFanInLinear (sparse, the paper's) or nn.Linear (the dense baseline), from a
                 random start (the release's) or from each label's centroid (start_from_centroids);
  meta           a small dense head from the encoder output to the label clusters; its loss
                 feeds the encoder with gradient while the sparse classifier is still poor, and
                 train.py switches it off partway through training.
The losses (Section 4) come last: the main loss over all labels, and the meta-classifier's. They
take any [B, L] scores, in either layout, with their positives as (rows, labels) lists; positives_of
makes those from a dense or sparse 0/1 target, so a forker's own model can use them. With
`loss_in_runs`, the sparse classifier computes its scores and the main loss a run of labels at a
time (label_loss_in_runs): the [B, L] scores are never whole. Beyond the paper, HASTE's classifier
(groups of labels sharing index rows, a dense head over the frequent labels) is an option here too.
"""
import inspect

import torch
from torch import nn
from torch.nn import functional as F

from sparse_layer import FixedFanInLinear


class BagOfWordsEncoder(nn.Module):
    """tf-idf weighted sum of word embeddings (nn.EmbeddingBag), then a nonlinearity."""

    def __init__(self, vocabulary_size, dim, dropout=0.0):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocabulary_size, dim, mode="sum")
        self.bias = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)
        self.out_features = dim

    def forward(self, batch):
        summed = self.embedding(batch.bag_ids, batch.bag_offsets, per_sample_weights=batch.bag_values)
        return self.dropout(torch.relu(summed + self.bias))


class TransformerEncoder(nn.Module):
    """A pretrained transformer (transformers.AutoModel), pooled by [CLS] or by the mean of tokens.

    Loaded without its pooler (where the model class has one), as the release does: its weights
    would never get a gradient, which DistributedDataParallel refuses. pretrained=False builds the
    architecture from the config alone, for a checkpoint that brings its own weights."""

    def __init__(self, name, pooling="cls", dropout=0.0, pretrained=True):
        super().__init__()
        from transformers import AutoConfig, AutoModel  # only needed for this encoder
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        config = AutoConfig.from_pretrained(name)
        model_class = AutoModel._model_mapping[type(config)]
        takes_pooler = "add_pooling_layer" in inspect.signature(model_class).parameters
        no_pooler = {"add_pooling_layer": False} if takes_pooler else {}
        self.transformer = (AutoModel.from_pretrained(name, **no_pooler) if pretrained
                            else AutoModel.from_config(config, **no_pooler))
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)  # the paper's embedding dropout
        self.out_features = self.transformer.config.hidden_size

    def forward(self, batch):
        if "pooled" in batch.tokens:  # a frozen encoder's outputs, computed once (train.py, --freeze-encoder)
            return self.dropout(batch.tokens["pooled"])
        return self.dropout(self.pool(batch.tokens))

    def pool(self, tokens):
        """The pooled outputs [B, H] of token ids, before the dropout."""
        mask = tokens["attention_mask"]
        hidden = self.transformer(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


ACTIVATIONS = {"none": nn.Identity, "gelu": nn.GELU, "relu": nn.ReLU}


def build(encoder, num_features, num_labels, *, num_clusters, dim, dropout, pooling, intermediate,
          intermediate_activation, sparse, fan_in, backend, pretrained=True, group_size=1, head=0):
    """The model from plain arguments (train.py stores them in checkpoints for evaluate.py).
    encoder: "bow" for the bag-of-words encoder, else a transformers model name or folder."""
    if encoder == "bow":
        body = BagOfWordsEncoder(num_features, dim, dropout)
    else:
        body = TransformerEncoder(encoder, pooling, dropout, pretrained)
    return XMCModel(body, num_labels, num_clusters, intermediate, intermediate_activation, sparse, fan_in, backend,
                    group_size, head)


# ---------------------------------------------------------------------------------------------
# Beyond the paper: its successor HASTE's classifier (arXiv 2606.01117). Groups of G labels share
# an index row (FixedFanInLinear's group_size) and a dense head scores the most frequent labels
# (HeadAndTail), both over the labels in an order of the classifier's own (label_order), which the
# model undoes: its scores, and the labels its losses take, are in the data's order.

GROUPINGS = ("frequency", "clusters", "random")


def label_order(grouping, counts, clusters=None, head=0, seed=0):
    """[L]: position p of the classifier scores label order[p]. The `head` most frequent labels
    first (the dense head's), then the rest, of which G consecutive positions form a group: by
    training frequency (HASTE's released configs), by PIFA cluster (the aux loss's leaves, in the
    tree's order, cut into groups and filled from the next leaf), or at random (seeded)."""
    by_frequency = torch.sort(counts, descending=True, stable=True).indices  # ties: the lower label first
    rest = by_frequency[head:]
    if grouping == "clusters":
        rest = rest[torch.sort(clusters[rest], stable=True).indices]
    elif grouping == "random":
        rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))]
    return torch.cat([by_frequency[:head], rest])


def head_size(fraction, labels, group_size):
    """Labels of the dense head: `fraction` of them, a multiple of G (HASTE), and fewer than L."""
    return min(group_size * round(fraction * labels / group_size), labels - 1)


class HeadAndTail(nn.Module):
    """A dense nn.Linear for the first `head` positions (the most frequent labels) beside a sparse
    FixedFanInLinear of groups of G for the rest (the tail), their scores side by side [B, L]:
    HASTE's alternative to the auxiliary loss, the head gives the encoder dense gradient."""

    def __init__(self, width, labels, head, fan_in, group_size, backend):
        super().__init__()
        self.head = nn.Linear(width, head)
        self.tail = FixedFanInLinear(width, labels - head, fan_in, backend=backend, group_size=group_size,
                                     contiguous_output=False)
        self.in_features, self.out_features = width, labels

    def forward(self, x):
        return torch.cat([self.head(x), self.tail(x)], dim=1)


def _start_from_rows(layer, weight, bias):
    """A classifier layer (dense, or sparse: from_dense's choice of inputs) started from dense rows."""
    dense = nn.Linear(weight.shape[1], len(weight))
    dense.weight.copy_(weight)
    dense.bias.copy_(bias)
    if isinstance(layer, FixedFanInLinear):
        dense = FixedFanInLinear.from_dense(dense, layer.fan_in, group_size=layer.group_size)
    layer.load_state_dict({k: v.to(layer.weight.device) for k, v in dense.state_dict().items()})


class XMCModel(nn.Module):
    def __init__(self, encoder, num_labels, num_clusters, intermediate, intermediate_activation, sparse, fan_in,
                 backend, group_size=1, head=0):
        super().__init__()
        self.encoder = encoder
        width = encoder.out_features
        self.intermediate = None
        if intermediate:
            self.intermediate = nn.Sequential(nn.Linear(width, intermediate), ACTIVATIONS[intermediate_activation]())
            width = intermediate
        if sparse and fan_in > width:  # a label cannot read more distinct inputs than there are
            raise ValueError(f"--fan-in {fan_in} is larger than the classifier's {width} inputs (the encoder's width, "
                             f"or --intermediate): choose at most {width}, or --no-sparse for a dense classifier")
        if sparse and head:
            self.classifier = HeadAndTail(width, num_labels, head, fan_in, group_size, backend)
        elif sparse:
            # a transposed view of the scores: the lean losses below take either layout, and this one
            # saves the two transposing copies a contiguous [B, L] result costs (README: measured)
            self.classifier = FixedFanInLinear(width, num_labels, fan_in, backend=backend, contiguous_output=False,
                                               group_size=group_size)
        else:
            self.classifier = nn.Linear(width, num_labels)
        self.meta = nn.Linear(encoder.out_features, num_clusters) if num_clusters else None
        self.loss_in_runs = False  # True (a sparse classifier): its loss a run of labels at a time, never [B, L]
        # where each label sits in the classifier's order (HASTE's): [L], or None (the data's order)
        self.register_buffer("label_position", torch.arange(num_labels) if sparse and (group_size > 1 or head) else None)

    def set_label_order(self, order):
        """The classifier's order of the labels (label_order): label order[p] at position p."""
        self.label_position.copy_(torch.argsort(order))

    @property
    def sparse_classifier(self):
        """The FixedFanInLinear that SET rewires (a HeadAndTail's tail), or None (a dense classifier)."""
        return self.classifier.tail if isinstance(self.classifier, HeadAndTail) else (
            self.classifier if isinstance(self.classifier, FixedFanInLinear) else None)

    def forward(self, batch, with_meta=False, loss=None):
        """Label scores [B, L], and the cluster scores [B, C] when asked (and a meta head exists).
        loss: (name, rows, labels) of LOSSES, returned in place of the scores, which nothing else
        reads then: its slope is written over them, or with `loss_in_runs` they are never whole."""
        features, hidden = self.inputs(batch)
        meta_scores = self.meta(features) if with_meta and self.meta is not None else None
        if loss is None:
            scores = self.classifier(hidden)  # in the data's order of labels, from the classifier's
            return scores if self.label_position is None else scores.index_select(1, self.label_position), meta_scores
        if self.label_position is not None:  # the loss sums over all labels: only the positives move
            loss = (loss[0], loss[1], self.label_position[loss[2]])
        if self.loss_in_runs:
            return label_loss_in_runs(self.classifier, hidden, *loss), meta_scores
        return LOSSES[loss[0]](self.classifier(hidden), *loss[1:], overwrite=True), meta_scores

    def inputs(self, batch):
        """(the encoder's output, the classifier's input: the intermediate layer's output, float32)"""
        features = self.encoder(batch)
        return features, features if self.intermediate is None else self.intermediate(features).float()

    @torch.no_grad()
    def start_from_centroids(self, hidden, rows, labels, scale=20.0, offset=0.5):
        """The classifier started from the data: label l's weights point to the centroid of its
        training documents' classifier inputs (hidden[rows] where labels == l), `scale` / the mean
        input norm long, and every bias -scale * offset. With a median of 9 documents a label
        (yso-finna-en-100k), where training starts decides more than how long it runs (README).
        A sparse classifier keeps each centroid's fan_in coordinates of largest |w|, as from_dense."""
        positions = labels if self.label_position is None else self.label_position.cpu()[labels]
        sums = torch.zeros(self.classifier.out_features, hidden.shape[1]).index_add_(0, positions, hidden[rows].float())
        length = scale / hidden.norm(dim=1).mean().clamp(min=1e-12)
        weight, bias = F.normalize(sums, dim=1) * length, torch.full((len(sums),), -scale * offset)
        if isinstance(self.classifier, HeadAndTail):  # the head's rows dense, the tail's after them
            head = self.classifier.head.out_features
            _start_from_rows(self.classifier.head, weight[:head], bias[:head])
            _start_from_rows(self.classifier.tail, weight[head:], bias[head:])
        else:
            _start_from_rows(self.classifier, weight, bias)

    def classifier_bytes(self, optimizer_slots=2):
        """Bytes of the classifier's parameters (+ indices) and their optimizer state (AdamW: 2
        slots per parameter), and what a dense classifier of the same shape would need."""
        params = list(self.classifier.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        buffer_bytes = sum(b.numel() * b.element_size() for b in self.classifier.buffers())
        rows, width = self.classifier.out_features, self.classifier.in_features
        dense = (rows * width + rows) * 4 * (1 + optimizer_slots)
        return param_bytes * (1 + optimizer_slots) + buffer_bytes, dense


# ---------------------------------------------------------------------------------------------
# Losses, from the list of positives: never a dense [B, L] label matrix, and no fp32 [B, L]
# temporaries either (at Amazon-3M, B = 128, each would be 1.44 GB): the loss is computed over label
# chunks, and its slope is written during the forward pass into one buffer of the scores' dtype and
# layout, which is all the backward pass needs. The buffer holds the slope unscaled: 1/(B*L) times
# it is below fp16's smallest number at the paper's shapes, so the loss's scale and the gradient
# scaler's factor (grad_output) are applied together, once, in the backward pass.

# Elements of a label chunk, by device type: the chunk's fp32 temporaries stay small (CPU: 16 MB,
# in cache; GPU: 128 MB, few launches).
LOSS_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 25}


# Each returns (the sum of the per-label loss over a block of scores z, its slope per element) for
# labels y = +1 or -1; one temporary the size of z where it can (a squared norm is a reduction, not
# a squared copy).

def _hinge(z, y):  # max(0, 1 - y z)^2, its slope -2 y max(0, 1 - y z)
    margin = (1 - z if y > 0 else z + 1).relu_()
    return torch.linalg.vector_norm(margin).square(), margin.mul_(-2 * y)


def _bce(z, y):  # -log(sigmoid(y z)): softplus(z) - z for y = +1, softplus(z) for y = -1
    if y > 0:
        return (F.softplus(z) - z).sum(), torch.sigmoid(z) - 1
    return F.softplus(z).sum(), torch.sigmoid(z)


def _as_positives(at_positives, per_label):
    """The positives' scores counted as positives, not negatives: (the change to the loss, their slope)."""
    (as_negative, _), (as_positive, slope) = per_label(at_positives, -1), per_label(at_positives, +1)
    return as_positive - as_negative, slope


class _LabelLoss(torch.autograd.Function):
    """scale * (sum over (b, l) of the per-label loss), every label taken as a negative, then the
    positives' terms swapped; the slope is written chunk by chunk as the loss is summed, into a
    buffer of its own or, `overwrite`, over the scores (a caller that no longer needs them: one
    [B, L] less, which would be 1.34 GiB at Amazon-3M's batch of 128)."""

    @staticmethod
    def forward(ctx, scores, rows, labels, per_label, scale, overwrite):
        # the same strides as the scores: [B, L] views of [L, B] stay that way
        slopes = scores.detach() if overwrite else torch.empty_like(scores)
        at_positives = scores[rows, labels].float()  # (read before any slope is written)
        total = torch.zeros((), dtype=torch.float32, device=scores.device)
        step = max(1, LOSS_CHUNK_ELEMENTS.get(scores.device.type, LOSS_CHUNK_ELEMENTS["cpu"]) // max(1, scores.shape[0]))
        for start in range(0, scores.shape[1], step):
            value, slope = per_label(scores[:, start:start + step].float(), -1)
            total += value
            slopes[:, start:start + step] = slope
        swapped, slope = _as_positives(at_positives, per_label)
        total += swapped
        slopes[rows, labels] = slope.to(slopes.dtype)
        ctx.save_for_backward(slopes)
        ctx.scale, ctx.used = scale, False
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:  # the buffer was scaled in place the first time
            raise RuntimeError("the label loss supports one backward pass per forward (no retain_graph)")
        ctx.used = True
        slopes, = ctx.saved_tensors
        # one factor, one rounding: under fp16, 1/(B*L) alone would underflow, grad_output (the
        # gradient scaler's 2^12 and more) alone would overflow the slopes
        return slopes.mul_(grad_output * ctx.scale), None, None, None, None, None


def positives_of(target, device=None):
    """(rows, labels): the positives of a [B, L] 0/1 target, what the losses below take. The target
    may be a dense tensor, a torch sparse one (COO or CSR) or a scipy sparse matrix; a value other
    than 0 and 1 is refused (these losses have no soft labels)."""
    if hasattr(target, "tocoo"):  # scipy.sparse, without importing it
        coo = target.tocoo()
        coo.sum_duplicates()
        rows, labels = torch.as_tensor(coo.row.astype("int64")), torch.as_tensor(coo.col.astype("int64"))
        values = torch.as_tensor(coo.data)
    else:
        if target.layout == torch.sparse_csr:
            target = target.to_sparse_coo()
        if target.layout == torch.sparse_coo:
            target = target.coalesce()
            (rows, labels), values = target.indices(), target.values()
        else:
            rows, labels = target.nonzero(as_tuple=True)
            values = target[rows, labels]
    keep = values != 0
    if not bool((values[keep] == 1).all()):
        raise ValueError("the target must hold 0 and 1 only (a positive is 1)")
    return rows[keep].to(device or rows.device), labels[keep].to(device or labels.device)


# Each loss by its parts: the per-label loss and its reduction over (b, l), a mean or a sum.
TERMS = {"squared_hinge": (_hinge, "mean"), "bce": (_bce, "sum"), "bce_mean": (_bce, "mean")}


def _label_loss(name, scores, rows, labels, overwrite):
    per_label, reduction = TERMS[name]
    return _LabelLoss.apply(scores, rows, labels, per_label, _scale(reduction, scores.numel()), overwrite)


def _scale(reduction, elements):
    return 1.0 / max(1, elements) if reduction == "mean" else 1.0


def squared_hinge(scores, rows, labels, overwrite=False):
    """mean over (b, l) of max(0, 1 - y z)^2 for the scores z, y = +1 for positives and -1 for the rest."""
    return _label_loss("squared_hinge", scores, rows, labels, overwrite)


def bce(scores, rows, labels, overwrite=False):
    """binary cross-entropy summed over (b, l), as the release (after Renee) computes it."""
    return _label_loss("bce", scores, rows, labels, overwrite)


def bce_mean(scores, rows, labels, overwrite=False):
    """binary cross-entropy, the mean over (b, l) (torch's default reduction)."""
    return _label_loss("bce_mean", scores, rows, labels, overwrite)


LOSSES = {"squared_hinge": squared_hinge, "bce": bce, "bce_mean": bce_mean}


def label_loss_in_runs(classifier, hidden, name, rows, labels):
    """LOSSES[name](classifier(hidden), rows, labels) for a FixedFanInLinear `classifier`, which
    computes its scores, this loss and their gradients a run of labels at a time: the [B, L] scores
    and slope are never whole (1.34 GiB each at Amazon-3M's batch of 128). The gradients are the
    same bits (BCE's on a CPU up to an ulp: its vector loop's scalar tail computes sigmoid otherwise,
    and falls elsewhere in a run); the loss sums its terms in another order."""
    per_label, reduction = TERMS[name]
    run = classifier.labels_a_run(hidden)
    labels, order = labels.sort(stable=True)  # a run's positives: one slice
    rows = rows[order]
    edges = torch.arange(0, classifier.out_features + run, run, device=labels.device)
    bounds = torch.searchsorted(labels, edges).tolist()

    def terms(start, zT):  # zT [run, B]: the scores of labels start, start + 1, ...
        lo, hi = bounds[start // run], bounds[start // run + 1]
        local, batch_rows = labels[lo:hi] - start, rows[lo:hi]
        at_positives = zT[local, batch_rows].float()
        value, slope = per_label(zT.float(), -1)  # every label a negative, then the positives swapped
        swapped, slope[local, batch_rows] = _as_positives(at_positives, per_label)
        return value + swapped, slope.to(zT.dtype)

    return classifier(hidden, terms, _scale(reduction, len(hidden) * classifier.out_features))


SUMMED = ("bce",)  # sums over the batch, not means: under torchrun each process's share is scaled back up


def meta_loss(meta_scores, rows, labels, clusters):
    """BCE of the cluster scores against 'the cluster holds a positive label' ([B, C] is small)."""
    targets = torch.zeros_like(meta_scores, dtype=torch.float32)
    targets[rows, clusters[labels]] = 1.0
    return F.binary_cross_entropy_with_logits(meta_scores.float(), targets)
