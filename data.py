"""Data: what a run reads, as the paper's method sees it (Sections 4-5): the data model (Split,
XMCData), the embedded synthetic data set (the default), tf-idf bags of words for the bag-of-words
encoder, PIFA label clusters for the auxiliary loss, and batches. Reading the XC repository's
files and the caches beside them is xc_files.py's.

Memory stays bounded at the paper's scale. Labels and bags of words are compact CSR arrays (int32
ids), never Python lists nor a dense [N, L] matrix; texts are streamed from disk whenever they are
needed (for the vocabulary, for bags of words or the clusters' PIFA vectors, a chunk of documents
at a time).
"""
import hashlib
import heapq
import itertools
import math
import re
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

MAX_VOCABULARY = 200_000  # a text data set's bag-of-words features: its words in most training documents
CHUNK_DOCUMENTS = 10_000  # texts turned into bags of words at a time


class DataError(ValueError):
    """Malformed or missing input; the message names the file and line."""


@dataclass
class Split:
    """N documents. Row i of a CSR pair is offsets[i]:offsets[i + 1] of its ids (and values)."""
    label_offsets: np.ndarray  # int64 [N + 1]
    label_ids: np.ndarray  # int32 [positives], sorted within each document
    bag_offsets: np.ndarray | None = None  # int64 [N + 1]; bags: files' or attach_bags'
    bag_ids: np.ndarray | None = None  # int32 [nnz], feature ids
    bag_values: np.ndarray | None = None  # float32 [nnz], tf-idf, L2-normalised per document
    texts: object = None  # raw texts, iterable (xc_files.Texts streams them from disk, or a list)
    excluded: tuple | None = None  # (offsets, label ids): pairs left out of the ranking (LF filter files)

    def __len__(self):
        return len(self.label_offsets) - 1

    def labels_of(self, row):
        return self.label_ids[self.label_offsets[row]:self.label_offsets[row + 1]]


@dataclass
class XMCData:
    name: str
    train: Split
    test: Split
    num_labels: int
    label_names: list | None = None  # names as in the files (raw text: sorted; LF: lbl.json's uid)
    num_features: int = 0  # bag-of-words features (text data sets: once word_statistics ran)
    vocabulary: list | None = None  # the words behind feature ids, when built from raw text
    feature_weights: np.ndarray | None = None  # what a bag weighs each feature by (idf_of, feature_weights)
    folder: Path | None = None  # where its files are, and its caches go
    fingerprint: str = ""  # its files and reading options: keys the caches
    propensity: tuple = (0.55, 1.5)  # PSP's constants A, B (Jain et al. 2016) of this data set
    fit: np.ndarray | None = None  # rows of `train` that training reads (hold_out); None: all of them
    validation: np.ndarray | None = None  # rows of `train` held out to choose the epoch (hold_out)

    def label_frequencies(self):
        """Training documents per label, of the whole training split (validation rows included, so
        that propensities do not depend on the hold-out)."""
        return np.bincount(self.train.label_ids, minlength=self.num_labels)

    def fit_rows(self):
        return np.arange(len(self.train)) if self.fit is None else self.fit


def hold_out(xmc, fraction, seed):
    """Hold out a seeded random `fraction` of the training documents as a validation split (rows of
    xmc.train, in file order): early stopping and the best epoch read it, so that no choice of a
    run reads the test split. Label ids and propensities stay those of the whole training split."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--validation-fraction must be in [0, 1), got {fraction}")
    count = min(max(round(fraction * len(xmc.train)), 1), len(xmc.train) - 1) if fraction > 0 else 0
    if fraction > 0 and count < 1:
        raise DataError(f"{xmc.name}: {len(xmc.train)} training document(s) are too few to hold out a validation split")
    # its own stream: the entropy word 2**40 is no epoch number, so this order is not epoch 0's shuffle
    held = np.random.default_rng([seed, 1 << 40]).permutation(len(xmc.train))[:count]
    xmc.validation = np.sort(held) if count else None
    xmc.fit = np.setdiff1d(np.arange(len(xmc.train)), held) if count else None


# ---------------------------------------------------------------------------------------------
# Compact arrays.

def offsets_of(lengths):
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])


def csr_rows(offsets, rows):
    """For CSR `offsets` and row numbers `rows`: (new offsets, positions of those rows' entries)."""
    lengths = offsets[rows + 1] - offsets[rows]
    new_offsets = offsets_of(lengths)
    positions = np.repeat(offsets[rows] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return new_offsets, positions


def sort_rows(offsets, ids, num_ids):
    """ids sorted within each CSR row (one sort of the keys row * num_ids + id)."""
    rows = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    return (np.sort(rows * num_ids + ids) % num_ids).astype(ids.dtype)


def batched(iterable, size):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def tfidf_bags(token_offsets, tokens, vocabulary_size, idf=None):
    """Bags from token lists (CSR): (offsets, ids, values, idf), values log(1 + count) * idf per
    distinct token, L2-normalised per document. Pass the training split's `idf` for any other
    documents; without it, the idf comes from these N documents (idf_of)."""
    num_docs = len(token_offsets) - 1
    doc = np.repeat(np.arange(num_docs), np.diff(token_offsets))
    keys, counts = np.unique(doc * vocabulary_size + tokens, return_counts=True)  # sorted by doc
    ids = keys % vocabulary_size
    offsets = np.searchsorted(keys // vocabulary_size, np.arange(num_docs + 1))
    if idf is None:
        idf = idf_of(np.bincount(ids, minlength=vocabulary_size), num_docs)
    return offsets, ids.astype(np.int32), normalise_rows(offsets, np.log1p(counts).astype(np.float32) * idf[ids]), idf


def idf_of(document_frequency, num_docs):
    """Each feature's idf, log((1 + N) / (1 + df)) + 1 over N documents; 0 for a feature none of
    them has: its embedding is never trained, so in a new document it would only add its random
    initialisation (a raw-text vocabulary leaves such words out)."""
    document_frequency = np.asarray(document_frequency)
    idf = np.log((1 + num_docs) / (1 + document_frequency)).astype(np.float32) + 1
    return np.where(document_frequency > 0, idf, np.float32(0))


def feature_weights(split, num_features, idf):
    """What a bag-of-words file's features weigh, from the training split's bags: their idf (idf_of;
    rare features weigh more, as in the bags built from raw text), else 1; either way 0 for a feature
    no training document has (Medical's test split has 555, in 308 of its 645 documents). A rule, not
    a choice by validation: a validation document is a training document, so it never has one."""
    document_frequency = np.bincount(split.bag_ids, minlength=num_features)
    return idf_of(document_frequency, len(split)) if idf else (document_frequency > 0).astype(np.float32)


def weigh_features(split, weights):
    """A split's bag values times their features' weights, L2-normalised again (in place)."""
    split.bag_values = normalise_rows(split.bag_offsets, split.bag_values * weights[split.bag_ids])


def normalise_rows(offsets, values):
    row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    norms = np.sqrt(np.bincount(row, weights=values.astype(np.float64) ** 2, minlength=len(offsets) - 1))
    return (values / np.maximum(norms, 1e-12)[row]).astype(np.float32)


def fingerprint(*parts):
    """A short hash of files (name, size, modification time) and options: the key of a cache, so
    that a changed file or option builds a new one."""
    digest = hashlib.sha1()
    for part in parts:
        if isinstance(part, Path):
            status = part.stat()
            part = (part.name, status.st_size, status.st_mtime_ns)
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Bags of words of text data sets (the bag-of-words encoder and the label clusters need them).

WORD = re.compile(r"[a-z0-9]+")


def texts_of(split, purpose=None):
    """The split's texts, checked to pair one to one with its label lines; with a progress bar
    that says what the pass is for, when one is given."""
    count = 0
    progress = dict(desc=purpose, total=len(split), disable=None if purpose else True, mininterval=2, leave=False)
    for text in tqdm(split.texts, **progress):
        count += 1
        if count > len(split):
            break
        yield text
    if count != len(split):
        found = f"more than {len(split)}" if count > len(split) else count
        raise DataError(f"{split.texts}: {found} texts for {len(split)} label lines: texts and labels must pair "
                        f"line by line")


def word_statistics(xmc):
    """Text data sets: the vocabulary (the MAX_VOCABULARY words in most training documents, ties in
    alphabetical order) and its idf, from one pass over the training texts, into xmc (once). The
    order is the feature ids: it must not depend on a set's iteration order, which changes with
    PYTHONHASHSEED from one process to the next (a resumed run, the ranks of a torchrun job)."""
    if xmc.vocabulary is not None or xmc.train.texts is None:
        return
    document_frequency = Counter()
    for text in texts_of(xmc.train, "vocabulary"):
        document_frequency.update(set(WORD.findall(text.lower())))
    by_frequency = heapq.nsmallest(MAX_VOCABULARY, document_frequency.items(), key=lambda item: (-item[1], item[0]))
    xmc.vocabulary = [word for word, _ in by_frequency]
    xmc.feature_weights = idf_of([document_frequency[word] for word in xmc.vocabulary], len(xmc.train))
    xmc.num_features = len(xmc.vocabulary)


def text_bags(texts, vocabulary, idf):
    """(offsets, ids, values) of texts' tf-idf bags over the vocabulary, CHUNK_DOCUMENTS at a time."""
    index = {word: i for i, word in enumerate(vocabulary)}
    for chunk in batched(texts, CHUNK_DOCUMENTS):
        tokens, counts = array("i"), array("q")
        for text in chunk:
            ids = [i for i in map(index.get, WORD.findall(text.lower())) if i is not None]
            tokens.extend(ids), counts.append(len(ids))
        yield tfidf_bags(offsets_of(counts), np.frombuffer(tokens, np.int32), len(vocabulary), idf)[:3]


def bag_chunks(xmc, split):
    """(first row, offsets, ids, values) of a split's bags, a chunk of documents at a time: slices
    of the bags in memory, or built from the texts as they stream by."""
    if split.bag_ids is None:
        word_statistics(xmc)
        start = 0
        for offsets, ids, values in text_bags(texts_of(split, "bags of words"), xmc.vocabulary, xmc.feature_weights):
            yield start, offsets, ids, values
            start += len(offsets) - 1
        return
    for start in range(0, len(split), CHUNK_DOCUMENTS):
        offsets = split.bag_offsets[start:start + CHUNK_DOCUMENTS + 1]
        entries = slice(offsets[0], offsets[-1])
        yield start, offsets - offsets[0], split.bag_ids[entries], split.bag_values[entries]


def join_bags(chunks):
    """One CSR (offsets, ids, values) of consecutive chunks of bags."""
    chunks = list(chunks)
    lengths = np.concatenate([np.diff(offsets) for offsets, _, _ in chunks] or [np.zeros(0, np.int64)])
    return (offsets_of(lengths), np.concatenate([ids for _, ids, _ in chunks] or [np.zeros(0, np.int32)]),
            np.concatenate([values for _, _, values in chunks] or [np.zeros(0, np.float32)]))


def attach_bags(xmc, splits=("train", "test"), vocabulary=None, idf=None):
    """Bags of words of a text data set's splits, for the bag-of-words encoder: over `vocabulary`
    and `idf` when given (a checkpoint's), else over the training texts' (word_statistics)."""
    if vocabulary is not None:
        xmc.vocabulary, xmc.feature_weights, xmc.num_features = list(vocabulary), idf, len(vocabulary)
    for split in (getattr(xmc, name) for name in splits):
        if split.bag_ids is None:
            bags = join_bags(chunk[1:] for chunk in bag_chunks(xmc, split))
            split.bag_offsets, split.bag_ids, split.bag_values = bags


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
    label_ids = (keys % num_labels).astype(np.int32)

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
    train = Split(label_offsets[: num_train + 1], label_ids[: label_offsets[num_train]], *train_bags[:3])
    test_offsets = label_offsets[num_train:] - label_offsets[num_train]
    test = Split(test_offsets, label_ids[label_offsets[num_train]:], *test_bags[:3])
    return XMCData("synthetic", train, test, num_labels, num_features=vocabulary,
                   fingerprint=fingerprint(label_ids.tobytes(), train.bag_ids.tobytes()))


# ---------------------------------------------------------------------------------------------
# Label clusters for the auxiliary (meta-classifier) loss, as in LightXML / AttentionXML.

def pifa_embeddings(xmc, dim=256, seed=0):
    """PIFA label vectors (normalised sum of each label's normalised training bags), in a random
    projection to `dim` dimensions: (Y^T X) R = Y^T (X R), accumulated one chunk of documents at a
    time, so neither an [L, F] matrix nor all training bags are ever held; cosine similarities are
    kept up to a small distortion (Johnson-Lindenstrauss)."""
    word_statistics(xmc)
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(xmc.num_features, dim, generator=generator) / math.sqrt(dim)
    label_sums = torch.zeros(xmc.num_labels, dim)
    for start, offsets, ids, values in bag_chunks(xmc, xmc.train):
        count = len(offsets) - 1
        docs = torch.from_numpy(np.repeat(np.arange(count), np.diff(offsets)))
        bags = torch.sparse_coo_tensor(torch.stack([docs, torch.from_numpy(ids.astype(np.int64))]),
                                       torch.from_numpy(values), (count, xmc.num_features), check_invariants=True)
        projected_docs = torch.sparse.mm(bags, projection)  # [count, dim]
        label_offsets, positions = csr_rows(xmc.train.label_offsets, np.arange(start, start + count))
        label_docs = torch.from_numpy(np.repeat(np.arange(count), np.diff(label_offsets)))
        label_sums.index_add_(0, torch.from_numpy(xmc.train.label_ids[positions].astype(np.int64)),
                              projected_docs[label_docs])
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
        sides = torch.stack([mask, ~mask]).to(vectors.dtype)  # the two sums as one product: no copy of either half
        centroids = torch.nn.functional.normalize(sides @ vectors, dim=1)
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


# ---------------------------------------------------------------------------------------------
# Batches.

@dataclass
class Batch:
    positive_rows: torch.Tensor  # [P]: document of each positive (row within the batch)
    positive_labels: torch.Tensor  # [P]: its label
    size: int
    bag_ids: torch.Tensor | None = None  # [nnz] for nn.EmbeddingBag
    bag_offsets: torch.Tensor | None = None  # [B]
    bag_values: torch.Tensor | None = None  # [nnz]
    tokens: dict | None = None  # input_ids, attention_mask [B, T] for a transformer
    excluded_rows: torch.Tensor | None = None  # pairs (row, label) evaluation must not rank
    excluded_labels: torch.Tensor | None = None

    def to(self, device):
        move = lambda v: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
        return Batch(**{k: {n: move(t) for n, t in v.items()} if isinstance(v, dict) else move(v)
                        for k, v in vars(self).items()})


def owners(offsets):
    """The row of every entry of a CSR, as an int64 tensor."""
    return torch.from_numpy(np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)))


def as_long(ids):
    return torch.from_numpy(ids.astype(np.int64))  # the ops' int64 paths; the arrays stay int32


def token_batch(tokens, rows):
    """input_ids and attention_mask of the rows, padded only as far as their longest: the extra
    padding of the cache is masked out, so cutting it changes nothing but the work. (A frozen
    encoder's cached outputs [N, H] instead: their rows, as "pooled".)"""
    if tokens.dtype.names is None:
        return {"pooled": torch.from_numpy(np.array(tokens[rows], dtype=np.float32))}
    chosen = tokens[rows]
    width = int(chosen["length"].max(initial=1))
    lengths = torch.from_numpy(chosen["length"].astype(np.int64))
    return {"input_ids": torch.from_numpy(chosen["ids"][:, :width].astype(np.int64)),
            "attention_mask": (torch.arange(width) < lengths[:, None]).long()}


def make_batch(split, rows, tokens=None):
    label_offsets, positions = csr_rows(split.label_offsets, rows)
    batch = Batch(owners(label_offsets), as_long(split.label_ids[positions]), size=len(rows))
    if split.bag_ids is not None:
        bag_offsets, positions = csr_rows(split.bag_offsets, rows)
        batch.bag_ids, batch.bag_offsets = as_long(split.bag_ids[positions]), torch.from_numpy(bag_offsets[:-1])
        batch.bag_values = torch.from_numpy(split.bag_values[positions])
    if tokens is not None:
        batch.tokens = token_batch(tokens, rows)
    if split.excluded is not None:
        excluded_offsets, positions = csr_rows(split.excluded[0], rows)
        batch.excluded_rows, batch.excluded_labels = owners(excluded_offsets), as_long(split.excluded[1][positions])
    return batch


def batches(split, batch_size, shuffle=False, seed=0, epoch=0, tokens=None, rank=0, world=1, even=False, rows=None):
    """Batches of a split (of its documents `rows`, in that order; default all); with shuffle, the
    order depends only on (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.

    Data-parallel training (world processes): this rank takes every world-th document of the order,
    starting at `rank`, as torch's DistributedSampler does, and batches of `batch_size` of them;
    the ranks' batches number i together are exactly batch i of world * batch_size documents of a
    single process. even=True (training) first drops the last len % world documents of the order,
    so that every rank runs the same number of steps of the same size (DDP's collectives need it).
    """
    rows = np.arange(len(split)) if rows is None else rows
    order = rows[np.random.default_rng([seed, epoch]).permutation(len(rows))] if shuffle else rows
    if even:
        order = order[:len(order) - len(order) % world]
    order = order[rank::world]
    for start in range(0, len(order), batch_size):
        yield make_batch(split, order[start:start + batch_size], tokens)
