"""The model (paper, Section 3 and Figure 1): encoder -> (intermediate layer) -> classifier, plus the
auxiliary meta-classifier.

  encoder        a pretrained transformer (the paper: bert-base-uncased) or a small bag-of-words
                 encoder that trains from scratch on a CPU;
  intermediate   optional dense layer W (e.g. 4096 wide): a sparse classifier passes little
                 gradient back to the encoder, a wide dense layer in between restores it. Linear
                 (as in the release) unless an activation is asked for; its output is cast to
                 float32, so the classifier computes in float32 under mixed precision;
  classifier     FixedFanInLinear (sparse, the paper's) or nn.Linear (the dense baseline);
  meta           a small dense head from the encoder output to the label clusters; its loss
                 feeds the encoder with gradient while the sparse classifier is still poor, and
                 train.py switches it off partway through training.
The losses (Section 4) come last: the main loss over all labels, and the meta-classifier's.
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
        mask = batch.tokens["attention_mask"]
        hidden = self.transformer(input_ids=batch.tokens["input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.dropout(pooled)


ACTIVATIONS = {"none": nn.Identity, "gelu": nn.GELU, "relu": nn.ReLU}


def build(encoder, num_features, num_labels, num_clusters=0, dim=256, dropout=0.0, pooling="cls",
          intermediate=0, intermediate_activation="none", sparse=True, fan_in=128, backend="auto", pretrained=True):
    """The model from plain arguments (train.py stores them in checkpoints for evaluate.py).
    encoder: "bow" for the bag-of-words encoder, else a transformers model name or folder."""
    if encoder == "bow":
        body = BagOfWordsEncoder(num_features, dim, dropout)
    else:
        body = TransformerEncoder(encoder, pooling, dropout, pretrained)
    return XMCModel(body, num_labels, num_clusters, intermediate, intermediate_activation, sparse, fan_in, backend)


class XMCModel(nn.Module):
    def __init__(self, encoder, num_labels, num_clusters=0, intermediate=0, intermediate_activation="none",
                 sparse=True, fan_in=128, backend="auto"):
        super().__init__()
        self.encoder = encoder
        width = encoder.out_features
        self.intermediate = None
        if intermediate:
            self.intermediate = nn.Sequential(nn.Linear(width, intermediate), ACTIVATIONS[intermediate_activation]())
            width = intermediate
        if sparse:
            self.classifier = FixedFanInLinear(width, num_labels, min(fan_in, width), backend=backend)
        else:
            self.classifier = nn.Linear(width, num_labels)
        self.meta = nn.Linear(encoder.out_features, num_clusters) if num_clusters else None

    def forward(self, batch, with_meta=False):
        """Label scores [B, L], and the cluster scores [B, C] when asked (and a meta head exists)."""
        features = self.encoder(batch)
        hidden = features if self.intermediate is None else self.intermediate(features).float()
        scores = self.classifier(hidden)
        meta_scores = self.meta(features) if with_meta and self.meta is not None else None
        return scores, meta_scores

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
# Losses, from the list of positives: never a dense [B, L] label matrix.

def squared_hinge(scores, rows, labels):
    """mean over (b, l) of max(0, 1 - y s)^2, y = +1 for positives and -1 for the rest: every
    label counted as a negative, then the positives' terms swapped."""
    scores = scores.float()
    positive = scores[rows, labels]
    as_negatives = torch.relu(1 + scores).square().sum()
    swap = (torch.relu(1 - positive).square() - torch.relu(1 + positive).square()).sum()
    return (as_negatives + swap) / scores.numel()


def bce(scores, rows, labels):
    """binary cross-entropy summed over (b, l), as the release (after Renee) computes it:
    softplus(s) for every label, minus s at the positives."""
    scores = scores.float()
    return F.softplus(scores).sum() - scores[rows, labels].sum()


def bce_mean(scores, rows, labels):
    """binary cross-entropy, the mean over (b, l) (torch's default reduction)."""
    return bce(scores, rows, labels) / scores.numel()


LOSSES = {"squared_hinge": squared_hinge, "bce": bce, "bce_mean": bce_mean}


def meta_loss(meta_scores, rows, labels, clusters):
    """BCE of the cluster scores against 'the cluster holds a positive label' ([B, C] is small)."""
    targets = torch.zeros_like(meta_scores, dtype=torch.float32)
    targets[rows, clusters[labels]] = 1.0
    return F.binary_cross_entropy_with_logits(meta_scores.float(), targets)
