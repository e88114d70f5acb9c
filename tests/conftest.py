"""Shared test helpers: the project root on sys.path, the independent dense reference, a stand-in
model of fixed scores, a tiny local BERT, small data sets written in every layout, the tiny
synthetic run (`tiny`) and a run stopped after an epoch (`run_until`)."""
import functools
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]


class FixedScores(torch.nn.Module):
    """A stand-in model whose scores are rows of a given matrix (one per document, in order)."""

    def __init__(self, scores):
        super().__init__()
        self.scores, self.seen = scores, 0

    def forward(self, batch):
        rows = self.scores[self.seen:self.seen + batch.size]
        self.seen += batch.size
        return rows, None


# A data set small enough to train on in a second or two (data.synthetic's arguments).
TINY = dict(num_labels=120, num_topics=6, vocabulary=600, num_train=600, num_test=150)


def dense_reference(x, weight, indices, bias, grad_y):
    """Forward and gradients of the fixed fan-in layer through its dense [L, D] matrix, in float64.

    Built with plain matrix algebra (not autograd through the code under test): W[l, indices[l, j]]
    accumulates weight[l, j], so duplicate indices add up, as they must.
    """
    x, weight, grad_y = x.double(), weight.double(), grad_y.double()
    dense = torch.zeros(weight.shape[0], x.shape[1], dtype=torch.float64)
    dense.scatter_add_(1, indices.long(), weight)
    y = x @ dense.T + (0 if bias is None else bias.double())
    grad_dense = grad_y.T @ x  # [L, D]
    return {
        "y": y,
        "grad_x": grad_y @ dense,
        "grad_weight": grad_dense.gather(1, indices.long()),
        "grad_bias": grad_y.sum(0),
    }


def assert_close(actual, expected, tol, scale=None):
    """|actual - expected| <= tol * (1 + scale), elementwise; `scale` bounds the terms' magnitudes."""
    scale = expected.abs() if scale is None else scale
    error = (actual.double().cpu() - expected).abs()
    bound = tol * (1 + scale)
    assert bool((error <= bound).all()), f"max error {error.max():.3g}, allowed {bound.min():.3g} or more"


WORDS = "red green blue apple pie sky sea fruit un ##ripe ##s".split()


def tiny_bert(directory, words=WORDS, hidden=16):
    """A tiny random BERT (without dropout) and its WordPiece tokenizer, saved in `directory`
    (offline stand-ins for bert-base-uncased); returns the directory."""
    import transformers
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocabulary)}).save_pretrained(directory)
    config = transformers.BertConfig(vocab_size=len(vocabulary), hidden_size=hidden, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=2 * hidden, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)  # no dropout: runs can be compared
    transformers.BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny local BERT's folder (tiny_bert), built once per test module."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def write(path, text, gz=False):
    """Write text to path (or path.gz, gzipped); returns the path written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def corpus(count, seed, num_labels=8):
    """(labels, text) rows: label l brings the word w<l>, and three noise words come along."""
    rng = np.random.default_rng(seed)
    rows = [([l], f"w{l} w{l + 10}") for l in range(num_labels)] if seed == 0 else []  # every label in training
    for _ in range(count - len(rows)):
        labels = sorted(set(rng.integers(0, num_labels, rng.integers(1, 4)).tolist()))
        rows.append((labels, " ".join([f"w{l}" for l in labels] + [f"w{n}" for n in rng.integers(8, 20, 3)])))
    return rows


def write_data_set(directory, layout, splits, gz=False, num_labels=8):
    """The same documents in one of the repository's layouts (labels: ids, names L00..., or targets)."""
    lines = lambda rows: "".join(row + "\n" for row in rows)
    folder = directory / "raw_text" if layout == "lf-under-raw_text" else directory
    for split, rows in splits.items():
        if layout == "bow":
            bags = [",".join(map(str, labels)) + " " + " ".join(f"{w[1:]}:1" for w in sorted(set(text.split())))
                    for labels, text in rows]
            write(directory / f"{split}.txt", lines([f"{len(rows)} 20 {num_labels}"] + bags), gz)
        elif layout in ("raw", "attentionxml"):
            write(directory / f"{split}_{'raw_texts' if layout == 'raw' else 'texts'}.txt", lines(t for _, t in rows), gz)
            write(directory / f"{split}_labels.txt", lines(" ".join(f"L{l:02d}" for l in labels) for labels, _ in rows), gz)
        else:
            records = [json.dumps({"uid": f"d{i}", "title": text, "content": text, "target_ind": labels})
                       for i, (labels, text) in enumerate(rows)]
            write(folder / ("trn.json" if split == "train" else "tst.json"), lines(records), gz)
    if layout.startswith("lf"):
        write(folder / "lbl.json", lines(json.dumps({"uid": f"L{l:02d}", "title": f"w{l} w{l}"}) for l in range(num_labels)), gz)
    return directory


SPLITS = {"train": corpus(40, 0), "test": corpus(12, 1)}


# model.build's arguments for tests that vary only a few (the library has no defaults of its own).
MODEL = dict(num_clusters=0, dim=256, dropout=0.0, pooling="cls", intermediate=0, intermediate_activation="none",
             sparse=True, fan_in=128, backend="auto")


def build_model(encoder, num_features, num_labels, **changes):
    import model
    return model.build(encoder, num_features, num_labels, **{**MODEL, **changes})


def refuse_to_open(monkeypatch, refused):
    """open() of the path `refused` fails as it would for a file the user may not read (as root,
    chmod stops no read, so the failure is made here)."""
    real_open = open

    def guarded(file, *arguments, **keywords):
        if str(file) == str(refused):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *arguments, **keywords)
    monkeypatch.setattr("builtins.open", guarded)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """A Config that trains the tests' tiny synthetic data set in a second or two."""
    import data
    from config import Config
    monkeypatch.setattr(data, "synthetic", functools.partial(data.synthetic, **TINY))
    return Config(out=str(tmp_path / "run"), epochs=3, dim=32, intermediate=0, fan_in=8, batch_size=32,
                  warmup_steps=5, lr_encoder=1e-3, rewire_interval=10, aux_weight=0.4, aux_epochs=2, max_leaf=20)


class Killed(Exception):
    """What run_until stops a run with."""


def run_until(config, epochs):
    """train.run(config), stopped right after the checkpoint of epoch `epochs` is written, as a kill
    would stop it: what --resume continues from."""
    import checkpoint
    import train
    save = checkpoint.save_epoch

    def save_then_stop(out, saved, best):
        save(out, saved, best)
        if saved["epochs_done"] == epochs:
            raise Killed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "save_epoch", save_then_stop)
        with pytest.raises(Killed):
            train.run(config)
