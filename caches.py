"""Caches next to a data set, the plumbing of data.py and xc_files.py (a paper reader can skip
this file): the label clusters of the aux loss, a transformer's token ids (a memory-mapped .npy
file, built once, reused by later runs and evaluate.py) and a frozen one's outputs. Each is written
once, atomically, under a name keyed by what it was built from, and rebuilt when damaged or
foreign, never trusted. Below them, the token ids themselves: texts cut and tokenised as the
encoder reads them, into rows (length, ids[max_length]).
"""
import functools
import os
import re
from pathlib import Path

import numpy as np
import torch

import data


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


def label_clusters(xmc, max_leaf, cache_dir):
    """Cluster id per label [L], cached in cache_dir under a name keyed by the data and max_leaf."""
    key = data.fingerprint(xmc.fingerprint, max_leaf, data.MAX_VOCABULARY)
    build = lambda file: save_array(file, data.cluster_labels(data.pifa_embeddings(xmc), max_leaf).numpy())
    valid = lambda a: a.shape == (xmc.num_labels,) and a.dtype == np.int64 and bool((a >= 0).all())
    return torch.from_numpy(np.array(cached(Path(cache_dir) / f"clusters_{max_leaf}_{key}.npy", build, valid)))


def token_cache(split, tokenizer_name, max_length, cache_dir):
    """The split's token rows, from a cache file keyed by its text files, the tokenizer (its whole
    definition, not only its name) and max_length; built on first use, one batch at a time."""
    tokenizer = load_tokenizer(tokenizer_name)
    definition = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else (tokenizer_name, len(tokenizer))
    key = data.fingerprint(*(p for part in split.texts.parts for p in part), definition, max_length)
    dtype = token_dtype(tokenizer, max_length)

    def build(file):
        rows = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=(len(split),))
        tokenize(data.texts_of(split, "token ids"), tokenizer, max_length, rows)
        rows.flush()

    return cached(Path(cache_dir) / f"tokens_{key}.npy", build, lambda a: a.shape == (len(split),) and a.dtype == dtype)


def pooled_cache(tokens, encode, width, key, cache_dir, batch_size=256):
    """A frozen encoder's outputs [N, width] (float32) of the token rows `tokens`, cached under a
    name keyed by `key` (what the encoder is); built once by encode(token batch), a batch of
    documents of about the same length at a time (the padding a batch computes is its longest's)."""
    def build(file):
        out = np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=(len(tokens), width))
        by_length = np.argsort(tokens["length"], kind="stable")
        for start in range(0, len(tokens), batch_size):
            rows = np.sort(by_length[start:start + batch_size])
            out[rows] = encode(data.token_batch(tokens, rows)).float().cpu().numpy()
        out.flush()

    name = f"pooled_{data.fingerprint(Path(tokens.filename).name, key)}.npy"
    return cached(Path(cache_dir) / name, build, lambda a: a.shape == (len(tokens), width) and a.dtype == np.float32)


# ---------------------------------------------------------------------------------------------
# Token ids for transformer encoders.

TOKENIZE_BATCH = 1000  # texts given to the tokenizer at a time


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
    for chunk in data.batched(texts, TOKENIZE_BATCH):
        out[start:start + len(chunk)] = encode(chunk, tokenizer, max_length, out.dtype)
        start += len(chunk)
    return out
