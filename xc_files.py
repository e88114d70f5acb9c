"""The Extreme Classification Repository's files, and the caches beside them: the plumbing of
data.py (a paper reader can skip this file). `prepare` is the seam train.py calls.

A data set is a folder in one of the repository's layouts, told apart by the files present
(`detect`); any file may also be gzipped (name.gz, but not both copies), and is read as a stream:
  bow   bag of words: train.txt, test.txt, header "N F L", then "l1,l2 f:v f:v ..." per document
        (0-based ids; a document without labels starts with a space);
  raw   raw text: {train,test}_raw_texts.txt (or AttentionXML's {train,test}_texts.txt), a
        document per line, and {train,test}_labels.txt, its space-separated label names;
  lf    label features: trn.json, tst.json, lbl.json (JSON lines, directly or under raw_text/),
        targets `target_ind` into lbl.json's lines; filter_labels_test.txt when present.
Label ids follow the official release: the sorted union of the training and test labels (names,
or target_ind integers), so a label seen only in the test split keeps a row and L is the data
set's published label count. Texts stay on disk (Texts streams them); `prepare` adds the label
clusters and a transformer's token ids, from caches next to the data (caches.py).
"""
import functools
import gzip
import json
import math
import time
import zlib
from array import array
from dataclasses import replace
from pathlib import Path

import numpy as np

import caches
import data

XC_REPOSITORY = "the Extreme Classification Repository (http://manikvarma.org/downloads/XC/XMLRepository.html)"


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
                        raise data.DataError(f"{path}:{number}: {key!r} is not a string")
                yield line

    def __str__(self):
        return " + ".join(str(path) for path, _ in self.parts)


# ---------------------------------------------------------------------------------------------
# Lines, plain or gzipped, as a stream.

def read_lines(path):
    """(line number, line) of a text file, plain or gzipped (*.gz). Lines end at "\\n" only: a stray
    "\\r" inside a text must not shift texts against their labels; "\\r\\n" is accepted, a missing
    final newline loses nothing, undecodable bytes become U+FFFD. A damaged or cut-short gzip
    stream is a data.DataError that names the file and the line it stopped at."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    number = 0
    try:
        f = opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="\n")  # -sig: drop a BOM
    except OSError as error:  # a folder, an unreadable file: named, in one line
        raise data.DataError(f"{path}: cannot be opened ({error.strerror or error})") from None
    with f:
        try:
            for number, line in enumerate(f, start=1):
                yield number, line.rstrip("\n").removesuffix("\r")
        except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
            raise data.DataError(f"{path}:{number + 1}: cannot be read ({error}): is the file damaged or cut "
                            f"short?") from None


def json_record(line, path, number, key):
    """A JSON line's object, which must hold `key`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise data.DataError(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict) or key not in record:
        raise data.DataError(f"{path}:{number}: no {key!r} key in this JSON line")
    return record


# ---------------------------------------------------------------------------------------------
# Readers, one per layout.

def parse_bow_line(line, where, num_features, num_labels):
    """"l1,l2 f:v f:v ..." (no labels: the line starts with a space or a feature): (sorted distinct
    labels, feature ids, values). Anything else raises a data.DataError that starts with `where`."""
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
        raise data.DataError(f"{where}: malformed line ({error}): {line[:80].strip()!r}") from None
    bad = [v for v in labels if not 0 <= v < num_labels] or [v for v in features if not 0 <= v < num_features]
    if bad:
        raise data.DataError(f"{where}: id {bad[0]} out of range ({num_features} features, {num_labels} labels)")
    return sorted(set(labels)), features, values


def parse_bow_lines(numbered_lines, path, num_features, num_labels):
    """A data.Split of bag-of-words lines, kept in compact arrays as they are parsed."""
    labels, label_counts, features, values, feature_counts = array("i"), array("q"), array("i"), array("f"), array("q")
    for number, line in numbered_lines:
        row_labels, row_features, row_values = parse_bow_line(line, f"{path}:{number}", num_features, num_labels)
        labels.extend(row_labels), label_counts.append(len(row_labels))
        features.extend(row_features), values.extend(row_values), feature_counts.append(len(row_features))
    bag_offsets = data.offsets_of(feature_counts)
    return data.Split(data.offsets_of(label_counts), np.frombuffer(labels, np.int32), bag_offsets,
                 np.frombuffer(features, np.int32), data.normalise_rows(bag_offsets, np.frombuffer(values, np.float32)))


def read_bow(path):
    """The repository's bag-of-words file: (data.Split, F, L)."""
    lines = read_lines(path)
    header = next(lines, (1, ""))[1].split()
    if len(header) != 3 or not all(h.isdigit() for h in header):
        raise data.DataError(f"{path}:1: expected a header 'N F L' (three counts), got {' '.join(header)!r}")
    n, num_features, num_labels = map(int, header)
    split = parse_bow_lines(lines, path, num_features, num_labels)
    if len(split) != n:
        raise data.DataError(f"{path}: header says {n} documents, the file has {len(split)}")
    return split, num_features, num_labels


def load_bow(name, files):
    train, num_features, num_labels = read_bow(files["train"])
    test, test_features, test_labels = read_bow(files["test"])
    require_documents(train.label_offsets, files["train"], "training")
    require_documents(test.label_offsets, files["test"], "test")
    if (test_features, test_labels) != (num_features, num_labels):
        raise data.DataError(f"{files['test']}:1: header has {test_features} features and {test_labels} labels, "
                        f"{files['train'].name} has {num_features} and {num_labels}")
    return data.XMCData(name, train, test, num_labels, num_features=num_features)


def read_label_names(path, index):
    """Label-name lines as CSR (offsets, ids), numbering each new name in `index` as it appears."""
    ids, counts = array("i"), array("q")
    for _, line in read_lines(path):
        names = set(line.split())
        ids.extend([index.setdefault(name, len(index)) for name in names])
        counts.append(len(names))
    return data.offsets_of(counts), np.frombuffer(ids, np.int32)


def load_raw_text(name, files):
    """Label ids: the label names of both splits, sorted (the release's convention)."""
    index = {}
    labels = {s: read_label_names(files[f"{s}_labels"], index) for s in ("train", "test")}
    for split, role in (("train", "training"), ("test", "test")):
        require_documents(labels[split][0], files[f"{split}_labels"], role)
    names = sorted(index)
    renumber = np.empty(len(index), dtype=np.int32)
    renumber[[index[n] for n in names]] = np.arange(len(names), dtype=np.int32)
    splits = {s: data.Split(offsets, data.sort_rows(offsets, renumber[ids], len(names)),
                       texts=Texts((files[f"{s}_texts"], None)))
              for s, (offsets, ids) in labels.items()}
    report_test_only_labels(name, splits["train"], len(names))
    return data.XMCData(name, splits["train"], splits["test"], len(names), names)


def require_documents(offsets, path, role):
    """An empty split is refused when it is read, before any model is built: nothing trains on no
    documents, and every run ends by scoring its test split."""
    if len(offsets) < 2:
        raise data.DataError(f"{path}: no documents; the {role} split needs at least one")


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
            raise data.DataError(f"{path}:{number}: target_ind is not a list of integers")
        bad = [t for t in targets if not 0 <= t < num_labels]
        if bad:
            raise data.DataError(f"{path}:{number}: target id {bad[0]} out of range (lbl.json has {num_labels} labels)")
        distinct = sorted(set(targets))
        ids.extend(distinct), counts.append(len(distinct))
    return data.offsets_of(counts), np.frombuffer(ids, np.int64)


def read_filter(path, num_docs, num_labels):
    """filter_labels_test.txt: (test document, raw label index) pairs, one per line."""
    pairs = array("q")
    for number, line in read_lines(path):
        fields = line.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise data.DataError(f"{path}:{number}: expected two integers 'document label', got {line[:80]!r}")
        document, label = map(int, fields)
        if document >= num_docs or label >= num_labels:
            raise data.DataError(f"{path}:{number}: pair ({document}, {label}) out of range ({num_docs} test documents, "
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
    train = data.Split(train_offsets, renumber(train_raw), texts=Texts(*train_texts))
    test = data.Split(test_offsets, renumber(test_raw), texts=Texts((files["test"], key)))
    if files.get("filter"):
        pairs = read_filter(files["filter"], len(test), len(label_names))
        pairs = pairs[np.isin(pairs[:, 1], union)]  # a label without a row is never ranked anyway
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))
        test.excluded = (np.searchsorted(pairs[order, 0], np.arange(len(test) + 1)), renumber(pairs[order, 1]))
    report_test_only_labels(name, train, len(union))
    return data.XMCData(name, train, test, len(union), [label_names[i] for i in union])


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
            raise data.DataError(f"{folder}: both {name} and {name}.gz exist; remove or rename one, so that it is clear "
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
    A missing folder or missing files are a data.DataError that names what is expected and where from."""
    folder = Path(folder)
    where_from = f"Download it from {XC_REPOSITORY} and unpack it there, or pass --data-dir."
    if not folder.is_dir():
        expected = EXPECTED if format == "auto" else " + ".join(n.replace("|", " or ") for n in LAYOUTS[format].values())
        raise data.DataError(f"no data set at {folder}: expected a folder with {expected}. {where_from}")
    order = [format] if format != "auto" else ["lf", "raw", "bow"] if prefer_text else ["bow", "raw", "lf"]
    found = {layout: layout_files(folder, layout) for layout in order}
    missing = {layout: [LAYOUTS[layout][role].replace("|", " or ") for role in LAYOUTS[layout] if not files[role]]
               for layout, files in found.items()}
    for layout in order:
        if not missing[layout]:
            return layout, {role: path for role, path in found[layout].items() if path}
    partial = [layout for layout in order if len(missing[layout]) < len(LAYOUTS[layout])]  # some files there
    if partial:
        raise data.DataError(f"{folder}: missing {', '.join(missing[partial[0]])} (each may be gzipped). {where_from}")
    raise data.DataError(f"no data set in {folder}: expected {EXPECTED}. {where_from}")


def count_text_labels(folder):
    """Distinct labels of a folder's raw-text training split (0 without one): config's folder defaults."""
    files = layout_files(Path(folder), "raw")
    if not all(files.values()):
        return 0
    return len({name for _, line in read_lines(files["train_labels"]) for name in line.split()})


def locate(name, data_dir="data"):
    """Where a data set is: "synthetic" (generated), or the absolute path of a named data set's
    folder under data_dir, or of `name` itself when it is a path."""
    if name == "synthetic":
        return name
    if name not in FOLDERS and "/" not in name and not Path(name).is_dir():
        raise data.DataError(f"unknown data set {name!r}: give synthetic, one of {', '.join(FOLDERS)}, or a folder")
    return str((Path(data_dir) / FOLDERS[name] if name in FOLDERS else Path(name)).resolve())


def name_of(folder):
    """A data set's name: its folder's, or for a raw_text/ (where LF files also live) its parent's."""
    folder = Path(folder).resolve()
    return folder.parent.name if folder.name == "raw_text" else folder.name


def load(source, format="auto", augment_labels=False, propensity=(0.55, 1.5), idf=False):
    """A data set: "synthetic" (generated) or a folder (any layout above; `format` forces one).
    Bag-of-words files come with their bags (their values weighted by data.feature_weights: with
    `idf` the training split's idf); text data sets keep their texts on disk (their bags are tf-idf,
    data.attach_bags)."""
    if source == "synthetic":
        return replace(data.synthetic(), propensity=tuple(propensity))
    folder = Path(source)
    layout, files = detect(folder, format)
    if augment_labels and layout != "lf":
        raise data.DataError(f"--augment-labels needs label texts, which only LF data sets have (lbl.json); {folder} "
                        f"holds '{layout}' files")
    reader = {"bow": load_bow, "raw": load_raw_text, "lf": functools.partial(load_lf, augment_labels=augment_labels)}
    xmc = reader[layout](name_of(folder), files)
    if layout == "bow":
        xmc.feature_weights = data.feature_weights(xmc.train, xmc.num_features, idf)
        for split in (xmc.train, xmc.test):
            data.weigh_features(split, xmc.feature_weights)
    xmc.folder = files["test"].parent if layout == "lf" else folder
    xmc.fingerprint = data.fingerprint(layout, augment_labels, *(["idf"] if idf and layout == "bow" else []),
                                       *sorted(files.values()))
    xmc.propensity = tuple(propensity)
    return xmc


def documents(lines, num_features, num_labels, vocabulary=None, feature_weights=None, where="<stdin>"):
    """New documents for a bag-of-words model's predict, as a data.Split without labels: texts through
    the training vocabulary and idf when the model was trained on raw text; otherwise "f:v f:v ..."
    lines as in the bag-of-words files (a leading label field is checked, then ignored; weighted by
    `feature_weights` when given, as training weighted the files' values). A document with no known
    word or feature gets an empty bag."""
    if vocabulary is None:
        split = parse_bow_lines(enumerate(lines, start=1), where, num_features, num_labels)
        if feature_weights is not None:  # the model's training split weighted its files' features so (load)
            data.weigh_features(split, feature_weights)
        bags = split.bag_offsets, split.bag_ids, split.bag_values
    else:
        bags = data.join_bags(data.text_bags(lines, vocabulary, feature_weights))
    return data.Split(np.zeros(len(lines) + 1, np.int64), np.zeros(0, np.int32), *bags)


# ---------------------------------------------------------------------------------------------
# Everything a run reads.

def prepare(source, format, augment_labels, propensity, idf, encoder, max_length, max_leaf, fallback):
    """The data set (load), and what a model reads besides it: bags of words for the bag-of-words
    encoder, label clusters for the aux loss (max_leaf: labels per cluster; None: no clusters),
    token-id caches for a transformer; caches next to the data, or in `fallback` (caches.cache_dir).
    Returns (xmc, clusters, {split: token rows} or None, seconds per stage)."""
    seconds, clock = {}, time.time()

    def lap(stage):
        nonlocal clock
        seconds[stage], clock = time.time() - clock, time.time()

    xmc = load(source, format, augment_labels, propensity, idf)
    if encoder == "bow":
        data.attach_bags(xmc)
    elif xmc.train.texts is None:
        raise data.DataError(f"--encoder {encoder} reads texts, and {source} holds bags of words only")
    lap("load_s")
    cache = caches.cache_dir(xmc, fallback)
    clusters = None if max_leaf is None else caches.label_clusters(xmc, max_leaf, cache)
    lap("clusters_s")
    tokens = None if encoder == "bow" else {s: caches.token_cache(getattr(xmc, s), encoder, max_length, cache)
                                            for s in ("train", "test")}
    lap("tokens_s")
    return xmc, clusters, tokens, seconds
