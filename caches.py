"""Caches next to a data set, the plumbing of data.py and xc_files.py (a paper reader can skip
this file): the label clusters of the aux loss, and a transformer's token ids (a memory-mapped .npy
file, built once, reused by later runs and evaluate.py). Each is written once, atomically, under a
name keyed by what it was built from, and rebuilt when damaged or foreign, never trusted."""
import os
from pathlib import Path

import numpy as np
import torch

import data
import token_ids


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
    tokenizer = token_ids.load_tokenizer(tokenizer_name)
    definition = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else (tokenizer_name, len(tokenizer))
    key = data.fingerprint(*(p for part in split.texts.parts for p in part), definition, max_length)
    dtype = token_ids.token_dtype(tokenizer, max_length)

    def build(file):
        rows = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=(len(split),))
        token_ids.tokenize(data.texts_of(split, "token ids"), tokenizer, max_length, rows)
        rows.flush()

    return cached(Path(cache_dir) / f"tokens_{key}.npy", build, lambda a: a.shape == (len(split),) and a.dtype == dtype)
