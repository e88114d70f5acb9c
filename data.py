"""Data: XMC readers, the embedded synthetic default, label clusters, token caches and batches
(paper, Sections 4-5).

A data set is a folder in one of the Extreme Classification Repository's layouts, told apart by
the files present (`detect`); any file may also be gzipped (name.gz), and is read as a stream:
  bow   bag of words: train.txt, test.txt, header "N F L", then "l1,l2 f:v f:v ..." per document
        (0-based ids; a document without labels starts with a space);
  raw   raw text: {train,test}_raw_texts.txt (or AttentionXML's {train,test}_texts.txt), a
        document per line, and {train,test}_labels.txt, its space-separated label names;
  lf    label features: trn.json, tst.json, lbl.json (JSON lines, directly or under raw_text/),
        targets `target_ind` into lbl.json's lines; filter_labels_test.txt when present.
Label ids follow the official release: the sorted union of the training and test labels (names,
or target_ind integers), so a label seen only in the test split keeps a row and L is the data
set's published label count.

Memory stays bounded at the paper's scale. Labels and bags of words are compact CSR arrays (int32
ids), never Python lists nor a dense [N, L] matrix. Texts stay on disk and are streamed whenever
they are needed: for the vocabulary, for bags of words or the clusters' PIFA vectors (a chunk of
documents at a time), and once into a token-id cache next to the data, from which transformer
batches are read (a memory-mapped .npy file, reused by later runs and evaluate.py).
"""
import functools
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import time
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

XC_REPOSITORY = "the Extreme Classification Repository (http://manikvarma.org/downloads/XC/XMLRepository.html)"
MAX_VOCABULARY = 200_000  # a text data set's bag-of-words features: its words in most training documents
CHUNK_DOCUMENTS = 10_000  # texts turned into bags of words at a time
TOKENIZE_BATCH = 1000  # texts given to the tokenizer at a time


class DataError(ValueError):
    """Malformed or missing input; the message names the file and line."""


class Texts:
    """A split's texts, read from disk each time they are iterated (never all held in memory).
    `parts`: (path, key) in order; a document per line, or the string under `key` of a JSON line."""

    def __init__(self, *parts):
        self.parts = parts

    def __iter__(self):
        for path, key in self.parts:
            for number, line in read_lines(path):
                if key is not None:
                    line = json_record(line, path, number, key)[key]
                    if not isinstance(line, str):
                        raise DataError(f"{path}:{number}: {key!r} is not a string")
                yield line

    def __str__(self):
        return " + ".join(str(path) for path, _ in self.parts)


@dataclass
class Split:
    """N documents. Row i of a CSR pair is offsets[i]:offsets[i + 1] of its ids (and values)."""
    label_offsets: np.ndarray  # int64 [N + 1]
    label_ids: np.ndarray  # int32 [positives], sorted within each document
    bag_offsets: np.ndarray | None = None  # int64 [N + 1]; bags: files' or attach_bags'
    bag_ids: np.ndarray | None = None  # int32 [nnz], feature ids
    bag_values: np.ndarray | None = None  # float32 [nnz], tf-idf, L2-normalised per document
    texts: Texts | list | None = None  # raw texts, for transformers and text bags of words
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
    idf: np.ndarray | None = None  # and their training-split idf: what new texts need (predict)
    folder: Path | None = None  # where its files are, and its caches go
    fingerprint: str = ""  # its files and reading options: keys the caches
    propensity: tuple = (0.55, 1.5)  # PSP's constants A, B (Jain et al. 2016) of this data set

    def label_frequencies(self):
        return np.bincount(self.train.label_ids, minlength=self.num_labels)


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
    documents; without it, the idf log((1 + N) / (1 + df)) + 1 comes from these N documents."""
    num_docs = len(token_offsets) - 1
    doc = np.repeat(np.arange(num_docs), np.diff(token_offsets))
    keys, counts = np.unique(doc * vocabulary_size + tokens, return_counts=True)  # sorted by doc
    ids = keys % vocabulary_size
    offsets = np.searchsorted(keys // vocabulary_size, np.arange(num_docs + 1))
    if idf is None:
        document_frequency = np.bincount(ids, minlength=vocabulary_size)
        idf = np.log((1 + num_docs) / (1 + document_frequency)).astype(np.float32) + 1
    return offsets, ids.astype(np.int32), normalise_rows(offsets, np.log1p(counts).astype(np.float32) * idf[ids]), idf


def normalise_rows(offsets, values):
    row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    norms = np.sqrt(np.bincount(row, weights=values.astype(np.float64) ** 2, minlength=len(offsets) - 1))
    return (values / np.maximum(norms, 1e-12)[row]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Lines, plain or gzipped, as a stream.

def read_lines(path):
    """(line number, line) of a text file, plain or gzipped (*.gz). Lines end at "\\n" only: a stray
    "\\r" inside a text must not shift texts against their labels; "\\r\\n" is accepted, a missing
    final newline loses nothing, undecodable bytes become U+FFFD. A damaged or cut-short gzip
    stream is a DataError that names the file and the line it stopped at."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    number = 0
    try:
        f = opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="\n")  # -sig: drop a BOM
    except OSError as error:  # a folder, an unreadable file: named, in one line
        raise DataError(f"{path}: cannot be opened ({error.strerror or error})") from None
    with f:
        try:
            for number, line in enumerate(f, start=1):
                yield number, line.rstrip("\n").removesuffix("\r")
        except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{path}:{number + 1}: cannot be read ({error}): is the file damaged or cut "
                            f"short?") from None


def json_record(line, path, number, key):
    """A JSON line's object, which must hold `key`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{path}:{number}: no {key!r} key in this JSON line")
    return record


# ---------------------------------------------------------------------------------------------
# Readers, one per layout.

def parse_bow_line(line, where, num_features, num_labels):
    """"l1,l2 f:v f:v ..." (no labels: the line starts with a space or a feature): (sorted distinct
    labels, feature ids, values). Anything else raises a DataError that starts with `where`."""
    tokens = line.split(" ")
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


def parse_bow_lines(numbered_lines, path, num_features, num_labels):
    """A Split of bag-of-words lines, kept in compact arrays as they are parsed."""
    labels, label_counts, features, values, feature_counts = array("i"), array("q"), array("i"), array("f"), array("q")
    for number, line in numbered_lines:
        row_labels, row_features, row_values = parse_bow_line(line, f"{path}:{number}", num_features, num_labels)
        labels.extend(row_labels), label_counts.append(len(row_labels))
        features.extend(row_features), values.extend(row_values), feature_counts.append(len(row_features))
    bag_offsets = offsets_of(feature_counts)
    return Split(offsets_of(label_counts), np.frombuffer(labels, np.int32), bag_offsets,
                 np.frombuffer(features, np.int32), normalise_rows(bag_offsets, np.frombuffer(values, np.float32)))


def read_bow(path):
    """The repository's bag-of-words file: (Split, F, L)."""
    lines = read_lines(path)
    header = next(lines, (1, ""))[1].split()
    if len(header) != 3 or not all(h.isdigit() for h in header):
        raise DataError(f"{path}:1: expected a header 'N F L' (three counts), got {' '.join(header)!r}")
    n, num_features, num_labels = map(int, header)
    split = parse_bow_lines(lines, path, num_features, num_labels)
    if len(split) != n:
        raise DataError(f"{path}: header says {n} documents, the file has {len(split)}")
    return split, num_features, num_labels


def load_bow(name, files):
    train, num_features, num_labels = read_bow(files["train"])
    test, test_features, test_labels = read_bow(files["test"])
    require_documents(train.label_offsets, files["train"], "training")
    require_documents(test.label_offsets, files["test"], "test")
    if (test_features, test_labels) != (num_features, num_labels):
        raise DataError(f"{files['test']}:1: header has {test_features} features and {test_labels} labels, "
                        f"{files['train'].name} has {num_features} and {num_labels}")
    return XMCData(name, train, test, num_labels, num_features=num_features)


def read_label_names(path, index):
    """Label-name lines as CSR (offsets, ids), numbering each new name in `index` as it appears."""
    ids, counts = array("i"), array("q")
    for _, line in read_lines(path):
        names = set(line.split())
        ids.extend([index.setdefault(name, len(index)) for name in names])
        counts.append(len(names))
    return offsets_of(counts), np.frombuffer(ids, np.int32)


def load_raw_text(name, files):
    """Label ids: the label names of both splits, sorted (the release's convention)."""
    index = {}
    labels = {s: read_label_names(files[f"{s}_labels"], index) for s in ("train", "test")}
    for split, role in (("train", "training"), ("test", "test")):
        require_documents(labels[split][0], files[f"{split}_labels"], role)
    names = sorted(index)
    renumber = np.empty(len(index), dtype=np.int32)
    renumber[[index[n] for n in names]] = np.arange(len(names), dtype=np.int32)
    splits = {s: Split(offsets, sort_rows(offsets, renumber[ids], len(names)),
                       texts=Texts((files[f"{s}_texts"], None)))
              for s, (offsets, ids) in labels.items()}
    report_test_only_labels(name, splits["train"], len(names))
    return XMCData(name, splits["train"], splits["test"], len(names), names)


def require_documents(offsets, path, role):
    """An empty split is refused when it is read, before any model is built: nothing trains on no
    documents, and every run ends by scoring its test split."""
    if len(offsets) < 2:
        raise DataError(f"{path}: no documents; the {role} split needs at least one")


def report_test_only_labels(name, train, num_labels):
    unseen = int((np.bincount(train.label_ids, minlength=num_labels) == 0).sum())
    if unseen:
        print(f"{name}: {unseen} labels have no training document; they keep a classifier row and count in "
              f"the test metrics (the release's label ids)")


def read_targets(path, num_labels):
    """target_ind of each JSON line of an LF file: CSR (offsets, raw label indices)."""
    ids, counts = array("q"), array("q")
    for number, line in read_lines(path):
        targets = json_record(line, path, number, "target_ind")["target_ind"]
        if not isinstance(targets, list) or not all(type(t) is int for t in targets):
            raise DataError(f"{path}:{number}: target_ind is not a list of integers")
        bad = [t for t in targets if not 0 <= t < num_labels]
        if bad:
            raise DataError(f"{path}:{number}: target id {bad[0]} out of range (lbl.json has {num_labels} labels)")
        distinct = sorted(set(targets))
        ids.extend(distinct), counts.append(len(distinct))
    return offsets_of(counts), np.frombuffer(ids, np.int64)


def read_filter(path, num_docs, num_labels):
    """filter_labels_test.txt: (test document, raw label index) pairs, one per line."""
    pairs = array("q")
    for number, line in read_lines(path):
        fields = line.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise DataError(f"{path}:{number}: expected two integers 'document label', got {line[:80]!r}")
        document, label = map(int, fields)
        if document >= num_docs or label >= num_labels:
            raise DataError(f"{path}:{number}: pair ({document}, {label}) out of range ({num_docs} test documents, "
                            f"{num_labels} labels)")
        pairs.extend((document, label))
    return np.frombuffer(pairs, np.int64).reshape(-1, 2)


def load_lf(name, files, augment_labels=False):
    """LF json. Text: `title` for data sets named "...Titles...", else `content` (the release's
    rule; `name` is the data set's folder, never its raw_text/). augment_labels: every label's title
    is one more training document with that label alone."""
    key = "title" if "titles" in name.lower() else "content"
    print(f"{name}: the documents' text is the {key!r} field of {files['train'].name} and {files['test'].name}")
    label_names = [str(json_record(line, files["labels"], number, "title").get("uid", number - 1))
                   for number, line in read_lines(files["labels"])]
    (train_offsets, train_raw), (test_offsets, test_raw) = (read_targets(files[s], len(label_names))
                                                            for s in ("train", "test"))
    require_documents(train_offsets, files["train"], "training")
    require_documents(test_offsets, files["test"], "test")
    train_texts = [(files["train"], key)]
    if augment_labels:
        train_offsets = np.concatenate([train_offsets, train_offsets[-1] + np.arange(1, len(label_names) + 1)])
        train_raw = np.concatenate([train_raw, np.arange(len(label_names))])
        train_texts.append((files["labels"], "title"))
    union = np.unique(np.concatenate([train_raw, test_raw]))  # the label ids: sorted target indices
    renumber = lambda raw: np.searchsorted(union, raw).astype(np.int32)
    train = Split(train_offsets, renumber(train_raw), texts=Texts(*train_texts))
    test = Split(test_offsets, renumber(test_raw), texts=Texts((files["test"], key)))
    if files.get("filter"):
        pairs = read_filter(files["filter"], len(test), len(label_names))
        pairs = pairs[np.isin(pairs[:, 1], union)]  # a label without a row is never ranked anyway
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))
        test.excluded = (np.searchsorted(pairs[order, 0], np.arange(len(test) + 1)), renumber(pairs[order, 1]))
    report_test_only_labels(name, train, len(union))
    return XMCData(name, train, test, len(union), [label_names[i] for i in union])


# ---------------------------------------------------------------------------------------------
# Layouts and named data sets.

LAYOUTS = {  # layout: {role: file name, "a|b" for either}; each may be gzipped
    "bow": {"train": "train.txt", "test": "test.txt"},
    "raw": {"train_texts": "train_raw_texts.txt|train_texts.txt", "train_labels": "train_labels.txt",
            "test_texts": "test_raw_texts.txt|test_texts.txt", "test_labels": "test_labels.txt"},
    "lf": {"train": "trn.json", "test": "tst.json", "labels": "lbl.json"},
}
EXPECTED = ("train.txt + test.txt (bag of words), {train,test}_raw_texts.txt + {train,test}_labels.txt (raw text), "
            "or trn.json + tst.json + lbl.json (LF, also under raw_text/); each may be gzipped (.gz)")
FOLDERS = {"delicious": "delicious", "wiki10-31k": "Wiki10-31K", "amazon670k": "Amazon-670K", "wiki500k": "Wiki-500K",
           "amazon3m": "Amazon-3M", "lf-amazontitles-131k": "LF-AmazonTitles-131K",
           "lf-wikiseealso-320k": "LF-WikiSeeAlso-320K"}


def find(folder, names):
    """The first of the names (each also gzipped) present in folder, else None. A file beside its
    gzipped copy is refused: which one holds the data set is the user's call, not ours."""
    for name in names.split("|"):
        present = [c for c in (folder / name, folder / f"{name}.gz") if c.is_file()]
        if len(present) == 2:
            raise DataError(f"{folder}: both {name} and {name}.gz exist; remove or rename one, so that it is clear "
                            f"which is read")
        if present:
            return present[0]
    return None


def layout_files(folder, layout):
    """{role: path or None}: the layout's files in folder (LF: or under raw_text/, whichever has more)."""
    folders = [folder, folder / "raw_text"] if layout == "lf" else [folder]
    found = max(({role: find(f, names) for role, names in LAYOUTS[layout].items()} for f in folders),
                key=lambda files: sum(path is not None for path in files.values()))
    if layout == "lf" and found["test"]:
        found["filter"] = find(found["test"].parent, "filter_labels_test.txt") or find(folder, "filter_labels_test.txt")
    return found


def detect(folder, format="auto", prefer_text=False):
    """(layout, {role: path}) of the data set in folder: `format` unless "auto", else the first complete
    layout, text layouts first for a transformer (prefer_text), the bag of words first otherwise.
    A missing folder or missing files are a DataError that names what is expected and where from."""
    folder = Path(folder)
    where_from = f"Download it from {XC_REPOSITORY} and unpack it there, or pass --data-dir."
    if not folder.is_dir():
        expected = EXPECTED if format == "auto" else " + ".join(n.replace("|", " or ") for n in LAYOUTS[format].values())
        raise DataError(f"no data set at {folder}: expected a folder with {expected}. {where_from}")
    order = [format] if format != "auto" else ["lf", "raw", "bow"] if prefer_text else ["bow", "raw", "lf"]
    found = {layout: layout_files(folder, layout) for layout in order}
    missing = {layout: [LAYOUTS[layout][role].replace("|", " or ") for role in LAYOUTS[layout] if not files[role]]
               for layout, files in found.items()}
    for layout in order:
        if not missing[layout]:
            return layout, {role: path for role, path in found[layout].items() if path}
    partial = [layout for layout in order if len(missing[layout]) < len(LAYOUTS[layout])]  # some files there
    if partial:
        raise DataError(f"{folder}: missing {', '.join(missing[partial[0]])} (each may be gzipped). {where_from}")
    raise DataError(f"no data set in {folder}: expected {EXPECTED}. {where_from}")


def locate(data, data_dir="data"):
    """Where a data set is: "synthetic" (generated), or the absolute path of a named data set's
    folder under data_dir, or of `data` itself when it is a path."""
    if data == "synthetic":
        return data
    if data not in FOLDERS and "/" not in data and not Path(data).is_dir():
        raise DataError(f"unknown data set {data!r}: give synthetic, one of {', '.join(FOLDERS)}, or a folder")
    return str((Path(data_dir) / FOLDERS[data] if data in FOLDERS else Path(data)).resolve())


def name_of(folder):
    """A data set's name: its folder's, or for a raw_text/ (where LF files also live) its parent's."""
    folder = Path(folder).resolve()
    return folder.parent.name if folder.name == "raw_text" else folder.name


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


def load(source, format="auto", augment_labels=False, propensity=(0.55, 1.5)):
    """A data set: "synthetic" (generated) or a folder (any layout above; `format` forces one).
    Bag-of-words files come with their bags; text data sets keep their texts on disk."""
    if source == "synthetic":
        return replace(synthetic(), propensity=tuple(propensity))
    folder = Path(source)
    layout, files = detect(folder, format)
    if augment_labels and layout != "lf":
        raise DataError(f"--augment-labels needs label texts, which only LF data sets have (lbl.json); {folder} "
                        f"holds '{layout}' files")
    reader = {"bow": load_bow, "raw": load_raw_text, "lf": functools.partial(load_lf, augment_labels=augment_labels)}
    xmc = reader[layout](name_of(folder), files)
    xmc.folder = files["test"].parent if layout == "lf" else folder
    xmc.fingerprint = fingerprint(layout, augment_labels, *sorted(files.values()))
    xmc.propensity = tuple(propensity)
    return xmc


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
    """Text data sets: the vocabulary (the MAX_VOCABULARY words in most training documents) and its
    idf, from one pass over the training texts, into xmc (once)."""
    if xmc.vocabulary is not None or xmc.train.texts is None:
        return
    document_frequency = Counter()
    for text in texts_of(xmc.train, "vocabulary"):
        document_frequency.update(set(WORD.findall(text.lower())))
    xmc.vocabulary = [word for word, _ in document_frequency.most_common(MAX_VOCABULARY)]
    frequency = np.array([document_frequency[word] for word in xmc.vocabulary], dtype=np.float64)
    xmc.idf = (np.log((1 + len(xmc.train)) / (1 + frequency)) + 1).astype(np.float32)
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
        for offsets, ids, values in text_bags(texts_of(split, "bags of words"), xmc.vocabulary, xmc.idf):
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
        xmc.vocabulary, xmc.idf, xmc.num_features = list(vocabulary), idf, len(vocabulary)
    for split in (getattr(xmc, name) for name in splits):
        if split.bag_ids is None:
            bags = join_bags(chunk[1:] for chunk in bag_chunks(xmc, split))
            split.bag_offsets, split.bag_ids, split.bag_values = bags


def documents(lines, num_features, num_labels, vocabulary=None, idf=None, where="<stdin>"):
    """New documents for a bag-of-words model's predict, as a Split without labels: texts through
    the training vocabulary and idf when the model was trained on raw text; otherwise "f:v f:v ..."
    lines as in the bag-of-words files (a leading label field is checked, then ignored). A document
    with no known word or feature gets an empty bag."""
    if vocabulary is None:
        split = parse_bow_lines(enumerate(lines, start=1), where, num_features, num_labels)
        bags = split.bag_offsets, split.bag_ids, split.bag_values
    else:
        bags = join_bags(text_bags(lines, vocabulary, idf))
    return Split(np.zeros(len(lines) + 1, np.int64), np.zeros(0, np.int32), *bags)


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
# Caches next to the data: written once, atomically; rebuilt when damaged.

def cache_dir(xmc, fallback):
    """Where xmc's caches go: next to its files, or `fallback` (the run directory) when that folder
    is read-only or the data is generated."""
    return xmc.folder if xmc.folder is not None and os.access(xmc.folder, os.W_OK) else Path(fallback)


def cached(path, build, valid):
    """The array in the .npy file `path` (memory-mapped) if it loads and passes `valid`; otherwise
    build(file) writes it to a temporary file, renamed into place once complete, so a crash never
    leaves half a cache, and a damaged or foreign file is rebuilt, never trusted."""
    if path.exists():
        try:
            array_ = np.load(path, mmap_mode="r")
            if valid(array_):
                return array_
        except (ValueError, OSError, EOFError):  # a damaged header, a short file
            pass
        print(f"{path}: not a valid cache; rebuilding it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        build(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def save_array(path, values):
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, values)


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


def label_clusters(xmc, max_leaf, cache_dir):
    """Cluster id per label [L], cached in cache_dir under a name keyed by the data and max_leaf."""
    key = fingerprint(xmc.fingerprint, max_leaf, MAX_VOCABULARY)
    build = lambda file: save_array(file, cluster_labels(pifa_embeddings(xmc), max_leaf).numpy())
    valid = lambda a: a.shape == (xmc.num_labels,) and a.dtype == np.int64 and bool((a >= 0).all())
    return torch.from_numpy(np.array(cached(Path(cache_dir) / f"clusters_{max_leaf}_{key}.npy", build, valid)))


# ---------------------------------------------------------------------------------------------
# Token ids for transformer encoders: a cache of [N] rows (length, ids[max_length]) per split.

def load_tokenizer(name):
    from transformers import AutoTokenizer  # only transformer runs need it
    tokenizer = AutoTokenizer.from_pretrained(name)
    tokenizer.padding_side = "right"  # token_batch cuts padding off the right
    return tokenizer


def token_dtype(tokenizer, max_length):
    ids = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32  # BERT's 30,522 ids fit 16 bits
    return np.dtype([("length", np.int32), ("ids", ids, (max_length,))])


@functools.lru_cache
def first_words(count):
    """`count` words: runs of non-blank characters, each ending at a blank or the end. Blanks are
    ASCII space, tab and newlines only: every tokenizer splits there (a Unicode space may be a
    control character that BERT deletes, joining the words beside it)."""
    return re.compile(r"(?:[ \t\n\r]*[^ \t\n\r]+(?![^ \t\n\r])){%d}" % count)


def encode(texts, tokenizer, max_length, dtype):
    """Rows (length, ids) of texts, truncated to max_length tokens, padded with the pad id.

    A transformer reads only the first max_length tokens and every word gives at least one, so a
    text is cut after max_length words before tokenising (at a blank, where the kept words
    tokenise exactly as in the whole text): a 700-word Wikipedia article costs 128 words, not 700.
    A cut text that still gives fewer tokens (words that tokenise to nothing) is tokenised whole."""
    cut = [match.group() if (match := first_words(max_length).match(text)) else text for text in texts]
    encoded = tokenizer(cut, max_length=max_length, truncation=True, padding="max_length", return_tensors="np")
    ids, lengths = encoded["input_ids"], encoded["attention_mask"].sum(1)
    again = [i for i, text in enumerate(texts) if lengths[i] < max_length and len(cut[i]) < len(text)]
    if again:
        whole = tokenizer([texts[i] for i in again], max_length=max_length, truncation=True, padding="max_length",
                          return_tensors="np")
        ids[again], lengths[again] = whole["input_ids"], whole["attention_mask"].sum(1)
    rows = np.empty(len(texts), dtype)
    rows["ids"], rows["length"] = ids, lengths
    return rows


def tokenize(texts, tokenizer, max_length, out=None):
    """Token rows of texts, TOKENIZE_BATCH at a time, into `out` (e.g. a memmap) or a new array."""
    texts = list(texts) if out is None else texts
    out = np.empty(len(texts), token_dtype(tokenizer, max_length)) if out is None else out
    start = 0
    for chunk in batched(texts, TOKENIZE_BATCH):
        out[start:start + len(chunk)] = encode(chunk, tokenizer, max_length, out.dtype)
        start += len(chunk)
    return out


def token_cache(split, tokenizer_name, max_length, cache_dir):
    """The split's token rows, from a cache file keyed by its text files, the tokenizer (its whole
    definition, not only its name) and max_length; built on first use, one batch at a time."""
    tokenizer = load_tokenizer(tokenizer_name)
    definition = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else (tokenizer_name, len(tokenizer))
    key = fingerprint(*(p for part in split.texts.parts for p in part), definition, max_length)
    dtype = token_dtype(tokenizer, max_length)

    def build(file):
        rows = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=(len(split),))
        tokenize(texts_of(split, "token ids"), tokenizer, max_length, rows)
        rows.flush()

    return cached(Path(cache_dir) / f"tokens_{key}.npy", build, lambda a: a.shape == (len(split),) and a.dtype == dtype)


# ---------------------------------------------------------------------------------------------
# Everything a run reads.

def prepare(source, format="auto", augment_labels=False, propensity=(0.55, 1.5), encoder="bow", max_length=128,
            max_leaf=None, fallback="."):
    """The data set (load), and what a model reads besides it: bags of words for the bag-of-words
    encoder, label clusters for the aux loss (max_leaf: labels per cluster; None: no clusters),
    token-id caches for a transformer; caches next to the data, or in `fallback` (cache_dir).
    Returns (xmc, clusters, {split: token rows} or None, seconds per stage)."""
    seconds, clock = {}, time.time()

    def lap(stage):
        nonlocal clock
        seconds[stage], clock = time.time() - clock, time.time()

    xmc = load(source, format, augment_labels, propensity)
    if encoder == "bow":
        attach_bags(xmc)
    elif xmc.train.texts is None:
        raise DataError(f"--encoder {encoder} reads texts, and {source} holds bags of words only")
    lap("load_s")
    cache = cache_dir(xmc, fallback)
    clusters = None if max_leaf is None else label_clusters(xmc, max_leaf, cache)
    lap("clusters_s")
    tokens = None if encoder == "bow" else {s: token_cache(getattr(xmc, s), encoder, max_length, cache)
                                            for s in ("train", "test")}
    lap("tokens_s")
    return xmc, clusters, tokens, seconds


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
    padding of the cache is masked out, so cutting it changes nothing but the work."""
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
