"""Data: XMC readers, the embedded synthetic default, label clusters and batches (paper, Sections 4-5).

Every document becomes a bag of words: (feature ids, tf-idf values, L2-normalised) for the
bag-of-words encoder and for the label clustering, plus its raw text when the data set has one
(for transformer encoders). Labels are kept as a compact list per document (CSR), never as a dense
[N, L] matrix.

Formats read (the Extreme Classification Repository's):
  raw text:     <dir>/{train,test}_raw_texts.txt (a document per line) and
                <dir>/{train,test}_labels.txt (space-separated label names per line);
  bag of words: <dir>/{train,test}.txt, header "N F L", then "l1,l2 f:v f:v ..." per document
                (0-based ids; a document without labels starts with a space).
"""
import hashlib
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

XC_REPOSITORY = "the Extreme Classification Repository (http://manikvarma.org/downloads/XC/XMLRepository.html)"


class DataError(ValueError):
    """Malformed or missing input; the message names the file and line."""


@dataclass
class Split:
    """N documents. Row i of a CSR pair is offsets[i]:offsets[i + 1] of its ids (and values)."""
    bag_offsets: np.ndarray  # int64 [N + 1]
    bag_ids: np.ndarray  # int64 [nnz], feature ids
    bag_values: np.ndarray  # float32 [nnz], tf-idf, L2-normalised per document
    label_offsets: np.ndarray  # int64 [N + 1]
    label_ids: np.ndarray  # int64 [positives]
    texts: list | None = None  # raw texts, for transformer encoders

    def __len__(self):
        return len(self.label_offsets) - 1

    def labels_of(self, row):
        return self.label_ids[self.label_offsets[row]:self.label_offsets[row + 1]]


@dataclass
class XMCData:
    name: str
    train: Split
    test: Split
    num_features: int
    num_labels: int
    label_names: list | None  # names as in the training files, when the data set has them
    propensity_a: float = 0.55  # Jain et al. (2016) propensity constants of this data set
    propensity_b: float = 1.5
    vocabulary: list | None = None  # the words behind feature ids, when built from raw text
    idf: np.ndarray | None = None  # and their training-split idf: what new texts need (predict)

    def label_frequencies(self):
        return np.bincount(self.train.label_ids, minlength=self.num_labels)


# ---------------------------------------------------------------------------------------------
# CSR helpers.

def csr_rows(offsets, rows):
    """For CSR `offsets` and row numbers `rows`: (new offsets, positions of those rows' entries)."""
    lengths = offsets[rows + 1] - offsets[rows]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)])
    positions = np.repeat(offsets[rows] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return new_offsets, positions


def to_csr(lists, dtype=np.int64):
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    return offsets, np.fromiter((v for x in lists for v in x), dtype=dtype, count=offsets[-1])


def tfidf_bags(token_offsets, tokens, vocabulary_size, idf=None):
    """Bags from token lists (CSR): (offsets, ids, values, idf), values log(1 + count) * idf per
    distinct token, L2-normalised per document. Pass the training split's `idf` for any other
    documents; without it, the idf log((1 + N) / (1 + df)) + 1 comes from these N documents."""
    num_docs = len(token_offsets) - 1
    doc = np.repeat(np.arange(num_docs), np.diff(token_offsets))
    keys, counts = np.unique(doc * vocabulary_size + tokens, return_counts=True)  # sorted by doc
    ids = keys % vocabulary_size
    offsets = np.searchsorted(keys // vocabulary_size, np.arange(num_docs + 1))
    if idf is None:
        document_frequency = np.bincount(ids, minlength=vocabulary_size)
        idf = np.log((1 + num_docs) / (1 + document_frequency)).astype(np.float32) + 1
    return offsets, ids, normalise_rows(offsets, np.log1p(counts).astype(np.float32) * idf[ids]), idf


def normalise_rows(offsets, values):
    row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    norms = np.sqrt(np.bincount(row, weights=values.astype(np.float64) ** 2, minlength=len(offsets) - 1))
    return (values / np.maximum(norms, 1e-12)[row]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Readers.

def require_files(directory, names, name):
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise DataError(f"data set '{name}' not found: expected {', '.join(str(directory / n) for n in names)} "
                        f"(missing: {', '.join(missing)}). Download it from {XC_REPOSITORY} and unpack it "
                        f"so that these files exist, or pass --data-dir.")


def read_bow(path):
    """The repository's bag-of-words file: (feature lists, value lists, label lists, F, L)."""
    features, values, labels = [], [], []
    # Undecodable bytes become U+FFFD, which then fails to parse as a number with file and line.
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().split()
        if len(header) != 3 or not all(h.isdigit() for h in header):
            raise DataError(f"{path}:1: expected a header 'N F L' (three counts), got {' '.join(header)!r}")
        n, num_features, num_labels = map(int, header)
        for number, line in enumerate(f, start=2):
            row_labels, row_features, row_values = parse_bow_line(line, f"{path}:{number}", num_features, num_labels)
            labels.append(row_labels)
            features.append(row_features)
            values.append(row_values)
    if len(labels) != n:
        raise DataError(f"{path}: header says {n} documents, the file has {len(labels)}")
    return features, values, labels, num_features, num_labels


def parse_bow_line(line, where, num_features, num_labels):
    """"l1,l2 f:v f:v ..." (no labels: the line starts with a space or a feature): (sorted distinct
    labels, feature ids, values). Anything else raises a DataError that starts with `where`."""
    tokens = line.rstrip("\r\n").split(" ")
    label_token = "" if ":" in tokens[0] else tokens.pop(0)
    try:
        labels = [int(t) for t in label_token.split(",")] if label_token else []
        pairs = [t.split(":") for t in tokens if t]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("a feature is not written as id:value")
        features, values = [int(p[0]) for p in pairs], [float(p[1]) for p in pairs]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("a feature value is not a finite number")
    except ValueError as error:
        raise DataError(f"{where}: malformed line ({error}): {line[:80].strip()!r}") from None
    bad = [v for v in labels if not 0 <= v < num_labels] or [v for v in features if not 0 <= v < num_features]
    if bad:
        raise DataError(f"{where}: id {bad[0]} out of range ({num_features} features, {num_labels} labels)")
    return sorted(set(labels)), features, values


def split_from_bow(features, values, labels):
    offsets, ids = to_csr(features)
    raw = np.fromiter((v for row in values for v in row), dtype=np.float32, count=len(ids))
    label_offsets, label_ids = to_csr(labels)
    return Split(offsets, ids, normalise_rows(offsets, raw), label_offsets, label_ids)


def load_bow(directory, name, **propensity):
    require_files(directory, ["train.txt", "test.txt"], name)
    *train, num_features, num_labels = read_bow(directory / "train.txt")
    *test, test_features, test_labels = read_bow(directory / "test.txt")
    if (test_features, test_labels) != (num_features, num_labels):
        raise DataError(f"{directory / 'test.txt'}:1: header has {test_features} features and {test_labels} labels, "
                        f"train.txt has {num_features} and {num_labels}")
    return XMCData(name, split_from_bow(*train), split_from_bow(*test), num_features, num_labels, None, **propensity)


WORD = re.compile(r"[a-z0-9]+")


def read_lines(path):
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return split_lines(f.read())


def split_lines(text):
    """Lines split on "\n" only: a stray "\r" inside a text must not shift texts against their
    labels. "\r\n" endings are accepted, and a missing final newline loses nothing."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines[-1] == "" else lines


def load_raw_text(directory, name, max_vocabulary=200_000, **propensity):
    """Raw texts + label names. Label ids follow first appearance in the training labels; a test
    label never seen in training cannot be predicted and is dropped (the count is printed)."""
    names = [f"{s}_{kind}.txt" for s in ("train", "test") for kind in ("raw_texts", "labels")]
    require_files(directory, names, name)
    splits, label_index, dropped = {}, {}, 0
    for split in ("train", "test"):
        texts, label_lines = read_lines(directory / f"{split}_raw_texts.txt"), read_lines(directory / f"{split}_labels.txt")
        if len(texts) != len(label_lines):
            raise DataError(f"{directory / f'{split}_labels.txt'}: {len(label_lines)} lines, but "
                            f"{split}_raw_texts.txt has {len(texts)}: the files must pair line by line")
        labels = []
        for line in label_lines:
            tokens = line.split()
            if split == "train":
                for token in tokens:
                    label_index.setdefault(token, len(label_index))
            known = sorted({label_index[t] for t in tokens if t in label_index})
            dropped += len(set(tokens)) - len(known)
            labels.append(known)
        splits[split] = (texts, labels)
    if dropped:
        print(f"{name}: {dropped} test labels never occur in training and are dropped")
    words = [[WORD.findall(t.lower()) for t in splits[s][0]] for s in ("train", "test")]
    vocabulary = {w: i for i, (w, _) in enumerate(Counter(w for doc in words[0] for w in doc).most_common(max_vocabulary))}
    tokens = [to_csr([[vocabulary[w] for w in doc if w in vocabulary] for doc in split]) for split in words]
    train_bags = tfidf_bags(*tokens[0], len(vocabulary))
    test_bags = tfidf_bags(*tokens[1], len(vocabulary), train_bags[3])
    make = lambda bags, split: Split(*bags[:3], *to_csr(splits[split][1]), texts=splits[split][0])
    return XMCData(name, make(train_bags, "train"), make(test_bags, "test"), len(vocabulary), len(label_index),
                   list(label_index), **propensity, vocabulary=list(vocabulary), idf=train_bags[3])


def documents(lines, num_features, num_labels, vocabulary=None, idf=None, where="<stdin>"):
    """New documents for predict, as a Split without labels: texts through the training vocabulary
    and idf when the model was trained on raw text; otherwise "f:v f:v ..." lines as in the
    bag-of-words files (a leading label field is checked, then ignored). A document with no known
    word or feature gets an empty bag."""
    if vocabulary is not None:
        index = {word: i for i, word in enumerate(vocabulary)}
        tokens = to_csr([[index[w] for w in WORD.findall(line.lower()) if w in index] for line in lines])
        offsets, ids, values, _ = tfidf_bags(*tokens, len(vocabulary), idf)
    else:
        rows = [parse_bow_line(line, f"{where}:{number}", num_features, num_labels)[1:]
                for number, line in enumerate(lines, start=1)]
        offsets, ids = to_csr([features for features, _ in rows])
        values = normalise_rows(offsets, np.fromiter((v for _, vs in rows for v in vs), np.float32, len(ids)))
    return Split(offsets, ids, values, np.zeros(len(lines) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64),
                 texts=list(lines))


# ---------------------------------------------------------------------------------------------
# The embedded default: a generated XMC problem.

def synthetic(num_labels=3000, num_topics=60, vocabulary=6000, num_train=30_000, num_test=6000,
              words_per_label=6, length=40, seed=0):
    """A deterministic, realistic XMC problem (no download, about a second).

    - Label frequencies follow a power law (Zipf, exponent 1): most labels are in the tail.
    - Labels belong to topics (num_topics groups); a topic owns a pool of words, and each label
      has `words_per_label` signature words drawn from its topic's pool.
    - A document has 1 + Poisson(1.5) labels: the first by label frequency, the others from the
      same topic with probability 0.7 (labels co-occur), else again by frequency.
    - Its `length` tokens: half signature words of its labels, a quarter words of their topics'
      pools, a quarter background noise from the whole vocabulary (Zipf again).
    """
    rng = np.random.default_rng(seed)
    num_docs = num_train + num_test
    label_p = 1.0 / np.arange(1, num_labels + 1)
    label_p = (label_p / label_p.sum())[rng.permutation(num_labels)]  # frequency unrelated to label id
    topic_of = rng.integers(0, num_topics, num_labels)
    by_topic = np.argsort(topic_of, kind="stable")  # labels grouped by topic
    topic_start = np.searchsorted(topic_of[by_topic], np.arange(num_topics))
    topic_size = np.bincount(topic_of, minlength=num_topics)
    pool = rng.permutation(vocabulary)[: vocabulary // num_topics * num_topics].reshape(num_topics, -1)
    signature = pool[topic_of[:, None], rng.integers(0, pool.shape[1], (num_labels, words_per_label))]

    # labels: a first one by frequency, then co-occurring ones
    first = rng.choice(num_labels, num_docs, p=label_p)
    extra_owner = np.repeat(np.arange(num_docs), rng.poisson(1.5, num_docs))
    topic = topic_of[first[extra_owner]]
    same_topic = by_topic[topic_start[topic] + (rng.random(len(topic)) * topic_size[topic]).astype(np.int64)]
    any_label = rng.choice(num_labels, len(extra_owner), p=label_p)
    extra = np.where(rng.random(len(extra_owner)) < 0.7, same_topic, any_label)
    owner = np.concatenate([np.arange(num_docs), extra_owner])
    keys = np.unique(owner * num_labels + np.concatenate([first, extra]))  # sorted, duplicates gone
    label_offsets = np.searchsorted(keys // num_labels, np.arange(num_docs + 1))
    label_ids = keys % num_labels

    # words: each token picks one of its document's labels, then a word of that label or topic
    def words_of_labels(count):
        doc = np.repeat(np.arange(num_docs), count)
        size = np.diff(label_offsets)[doc]
        return label_ids[label_offsets[doc] + (rng.random(len(doc)) * size).astype(np.int64)]

    half, quarter = length // 2, length // 4
    signature_words = signature[words_of_labels(half), rng.integers(0, words_per_label, num_docs * half)]
    topic_words = pool[topic_of[words_of_labels(quarter)], rng.integers(0, pool.shape[1], num_docs * quarter)]
    noise_p = 1.0 / np.arange(1, vocabulary + 1)
    noise = rng.choice(vocabulary, (num_docs, length - half - quarter), p=noise_p / noise_p.sum())
    tokens = np.concatenate([signature_words.reshape(num_docs, half), topic_words.reshape(num_docs, quarter), noise], 1)

    token_offsets = np.arange(num_train + 1) * length
    train_bags = tfidf_bags(token_offsets, tokens[:num_train].ravel(), vocabulary)
    test_bags = tfidf_bags(np.arange(num_test + 1) * length, tokens[num_train:].ravel(), vocabulary, train_bags[3])
    train = Split(*train_bags[:3], label_offsets[: num_train + 1], label_ids[: label_offsets[num_train]])
    test_offsets = label_offsets[num_train:] - label_offsets[num_train]
    test = Split(*test_bags[:3], test_offsets, label_ids[label_offsets[num_train]:])
    return XMCData("synthetic", train, test, vocabulary, num_labels, None)


# Data sets by name: (directory under --data-dir, format, propensity A, B).
DATASETS = {
    "delicious": ("delicious", "bow", 0.55, 1.5),
    "wiki10-31k": ("Wiki10-31K", "raw", 0.55, 1.5),
    "amazon670k": ("Amazon-670K", "raw", 0.6, 2.6),
    "wiki500k": ("Wiki-500K", "raw", 0.5, 0.4),
    "amazon3m": ("Amazon-3M", "raw", 0.6, 2.6),
}


def load(name, data_dir="data"):
    """A data set by name: "synthetic" (generated) or one of DATASETS, read from data_dir."""
    if name == "synthetic":
        return synthetic()
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: choose synthetic or one of {', '.join(DATASETS)}")
    directory, kind, a, b = DATASETS[name]
    reader = load_bow if kind == "bow" else load_raw_text
    return reader(Path(data_dir) / directory, name, propensity_a=a, propensity_b=b)


# ---------------------------------------------------------------------------------------------
# Label clusters for the auxiliary (meta-classifier) loss, as in LightXML / AttentionXML.

def pifa_embeddings(split, num_features, num_labels, dim=256, seed=0):
    """PIFA label vectors (normalised sum of each label's normalised training bags), in a random
    projection to `dim` dimensions: (Y^T X) R = Y^T (X R), so no [L, F] matrix is ever built and
    cosine similarities are kept up to a small distortion (Johnson-Lindenstrauss)."""
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(num_features, dim, generator=generator) / math.sqrt(dim)
    docs = torch.from_numpy(np.repeat(np.arange(len(split)), np.diff(split.bag_offsets)))
    bags = torch.sparse_coo_tensor(torch.stack([docs, torch.from_numpy(split.bag_ids)]),
                                   torch.from_numpy(split.bag_values), (len(split), num_features),
                                   check_invariants=True)
    projected_docs = torch.sparse.mm(bags, projection)  # [N, dim]
    label_docs = torch.from_numpy(np.repeat(np.arange(len(split)), np.diff(split.label_offsets)))
    label_sums = torch.zeros(num_labels, dim).index_add_(0, torch.from_numpy(split.label_ids), projected_docs[label_docs])
    return torch.nn.functional.normalize(label_sums, dim=1)


def balanced_2means(vectors, iterations=10):
    """Split rows of unit `vectors` into two halves of equal size (+-1) by spherical 2-means:
    rows go to the centroid they prefer most, the split made at the median preference."""
    centroids = vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(len(vectors)))[:2]]
    for _ in range(iterations):
        preference = vectors @ (centroids[0] - centroids[1])
        left = preference.argsort(descending=True)[: (len(vectors) + 1) // 2]
        mask = torch.zeros(len(vectors), dtype=torch.bool)
        mask[left] = True
        centroids = torch.nn.functional.normalize(torch.stack([vectors[mask].sum(0), vectors[~mask].sum(0)]), dim=1)
    return mask


def cluster_labels(embeddings, max_leaf=100):
    """cluster id per label [L]: split recursively by balanced 2-means until each cluster has at
    most `max_leaf` labels."""
    clusters, pending = [], [torch.arange(len(embeddings))]
    while pending:
        members = pending.pop()
        if len(members) <= max_leaf:
            clusters.append(members)
            continue
        left = balanced_2means(embeddings[members])
        pending += [members[left], members[~left]]
    assignment = torch.empty(len(embeddings), dtype=torch.int64)
    for number, members in enumerate(clusters):
        assignment[members] = number
    return assignment


def label_clusters(data, max_leaf=100, cache_dir=None):
    """Cluster id per label, cached on disk (as .npy) under `cache_dir` when one is given."""
    key = hashlib.sha1(data.train.label_ids.tobytes() + data.train.bag_ids.tobytes()[:1 << 20]).hexdigest()[:12]
    path = cache_dir and Path(cache_dir) / f"clusters_{data.name}_{max_leaf}_{key}.npy"
    if path and path.exists():
        return torch.from_numpy(np.load(path))
    assignment = cluster_labels(pifa_embeddings(data.train, data.num_features, data.num_labels), max_leaf)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(temporary, assignment.numpy())
        os.replace(temporary, path)  # atomic: a crash never leaves half a cache file
    return assignment


# ---------------------------------------------------------------------------------------------
# Batches.

@dataclass
class Batch:
    bag_ids: torch.Tensor  # [nnz] for nn.EmbeddingBag
    bag_offsets: torch.Tensor  # [B]
    bag_values: torch.Tensor  # [nnz]
    positive_rows: torch.Tensor  # [P]: document of each positive (row within the batch)
    positive_labels: torch.Tensor  # [P]: its label
    size: int
    tokens: dict | None = None  # input_ids, attention_mask [B, T] for a transformer

    def to(self, device):
        moved = {k: v.to(device, non_blocking=True) for k, v in vars(self).items() if torch.is_tensor(v)}
        tokens = self.tokens and {k: v.to(device) for k, v in self.tokens.items()}
        return Batch(**moved, size=self.size, tokens=tokens)


def make_batch(split, rows, tokens=None):
    bag_offsets, bag_positions = csr_rows(split.bag_offsets, rows)
    label_offsets, label_positions = csr_rows(split.label_offsets, rows)
    return Batch(
        bag_ids=torch.from_numpy(split.bag_ids[bag_positions]),
        bag_offsets=torch.from_numpy(bag_offsets[:-1]),
        bag_values=torch.from_numpy(split.bag_values[bag_positions]),
        positive_rows=torch.from_numpy(np.repeat(np.arange(len(rows)), np.diff(label_offsets))),
        positive_labels=torch.from_numpy(split.label_ids[label_positions]),
        size=len(rows),
        tokens=tokens and {k: v[rows] for k, v in tokens.items()},
    )


def batches(split, batch_size, shuffle=False, seed=0, epoch=0, tokens=None, rank=0, world=1, even=False):
    """Batches of a split; with shuffle, the order depends only on (seed, epoch), so a resumed run
    sees the same batches as an uninterrupted one.

    Data-parallel training (world processes): this rank takes every world-th document of the order,
    starting at `rank`, as torch's DistributedSampler does, and batches of `batch_size` of them;
    the ranks' batches number i together are exactly batch i of world * batch_size documents of a
    single process. even=True (training) first drops the last len % world documents of the order,
    so that every rank runs the same number of steps of the same size (DDP's collectives need it).
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(split)) if shuffle else np.arange(len(split))
    if even:
        order = order[:len(order) - len(order) % world]
    order = order[rank::world]
    for start in range(0, len(order), batch_size):
        yield make_batch(split, order[start:start + batch_size], tokens)


def tokenize(texts, tokenizer_name, max_length):
    """input_ids and attention_mask [N, max_length] of a pretrained tokenizer (transformers)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    encoded = tokenizer(texts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
