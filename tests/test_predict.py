"""predict (evaluate.py --predict) and the defined behaviour of odd documents, on tiny data sets
written in both of the repository's formats."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import xc_files
import evaluate
import train
from checkpoint import load_checkpoint
from config import Config
from conftest import refuse_to_open

ROOT = Path(__file__).resolve().parent.parent


def tiny_corpus(num_docs, seed):
    """(texts, label-name lines, bag-of-words lines): label t has the words "w{t}a w{t}b"."""
    rng = np.random.default_rng(seed)
    texts, names, bows = [], [], []
    for _ in range(num_docs):
        labels = sorted(set(rng.integers(0, 12, rng.integers(1, 3)).tolist()))
        words = [f"w{t}{c}" for t in labels for c in "ab"] + [f"noise{n}" for n in rng.integers(0, 5, 2)]
        texts.append(" ".join(rng.permutation(words)))
        names.append(" ".join(f"tag{t}" for t in labels))
        features = sorted({2 * t + (c == "b") for t in labels for c in "ab"})
        bows.append(",".join(map(str, labels)) + " " + " ".join(f"{f}:1" for f in features))
    return texts, names, bows


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    """'tiny-raw' and 'tiny-bow' under tmp_path/data, with the odd documents of the real ones: a
    training document without labels, one without text or features, a test label never trained on."""
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "bow").mkdir()
    for split, count, seed in (("train", 300, 0), ("test", 60, 1)):
        texts, names, bows = tiny_corpus(count, seed)
        if split == "train":
            texts[0], names[1], bows[0], bows[1] = "", "", "3", " 0:1 1:1"
        else:
            names[0], bows[0] = names[0] + " never-trained", bows[0]
        (tmp_path / "data" / "raw" / f"{split}_raw_texts.txt").write_text("\n".join(texts) + "\n")
        (tmp_path / "data" / "raw" / f"{split}_labels.txt").write_text("\n".join(names) + "\n")
        (tmp_path / "data" / "bow" / f"{split}.txt").write_text(f"{count} 24 12\n" + "\n".join(bows) + "\n")
    return tmp_path


def trained(datasets, name):
    folder = datasets / "data" / name.removeprefix("tiny-").removesuffix("-idf")
    config = Config(data=str(folder), out=str(datasets / name), epochs=4, dim=32, fan_in=8, intermediate=32,
                    batch_size=32, warmup_steps=5, rewire_interval=5, lr_encoder=1e-2, aux_weight=0.0, device="cpu",
                    idf=name.endswith("-idf"))
    results = train.run(config)
    return Path(config.out) / "checkpoint.pt", results


@pytest.mark.parametrize("name", ["tiny-raw", "tiny-bow", "tiny-bow-idf"])
def test_predict_ranks_new_documents_as_the_test_split_is_ranked(datasets, name, capsys):
    """documents() must turn a line into the same bag as the data set's reader did: text through
    the training vocabulary and idf, or 'f:v' features L2-normalised (and weighted by the training
    split's idf, with --idf)."""
    checkpoint, results = trained(datasets, name)
    assert results["P@1"] > 50  # it learned: each label has its own two words
    network, xmc, batches, _ = evaluate.load_for_evaluation(checkpoint, 16, "cpu")
    expected_labels, expected_scores = evaluate.predict_top_k(network, batches, 3, "cpu")

    path = datasets / "data" / ("raw/test_raw_texts.txt" if name == "tiny-raw" else "bow/test.txt")
    weights = load_checkpoint(checkpoint)["inputs"]["feature_weights"]  # idf, or 1 (0: in no training document)
    assert (set(weights.unique().tolist()) <= {0.0, 1.0}) == (name == "tiny-bow")
    lines = [line for _, line in xc_files.read_lines(path)][0 if name == "tiny-raw" else 1:]  # no bag-of-words header
    predicted = evaluate.predict(load_checkpoint(checkpoint), checkpoint.parent, lines, 3, 7, "cpu", "test")
    assert len(predicted) == len(lines)
    names = xmc.label_names or [str(label) for label in range(xmc.num_labels)]
    for line, labels, scores in zip(predicted, expected_labels, expected_scores):
        pairs = [pair.rsplit(":", 1) for pair in line.split(" ")]
        assert [label for label, _ in pairs] == [names[label] for label in labels]
        np.testing.assert_allclose([float(score) for _, score in pairs], scores, atol=1e-4)
    if name == "tiny-raw":
        assert names[expected_labels[0, 0]].startswith("tag")  # label names, as in the training files


def test_a_checkpoints_feature_weights_read_back():
    assert evaluate.feature_weights({"feature_weights": torch.tensor([0.0, 1.5])}).tolist() == [0.0, 1.5]
    assert evaluate.feature_weights({"feature_weights": None}) is None


def test_odd_documents_have_defined_behaviour(datasets, capsys):
    """Raw text: the empty training text has an empty bag, the training document without labels is
    a negative for every label, the test label never seen in training keeps a row (and is said
    so). A new document with no known word is scored from the biases alone, and said so."""
    checkpoint, results = trained(datasets, "tiny-raw")
    assert "1 labels have no training document" in capsys.readouterr().out
    xmc = xc_files.load(datasets / "data" / "raw")
    data.attach_bags(xmc)
    assert xmc.train.bag_offsets[1] == 0 and len(xmc.train.labels_of(1)) == 0
    assert "never-trained" in xmc.label_names and xmc.num_labels == 13
    assert all(np.isfinite(value) for value in results.values())
    state = load_checkpoint(checkpoint)
    unknown, other_unknown, known = evaluate.predict(state, checkpoint.parent, ["", "zzz qqq", "w3a w3b"], 2, 4, "cpu",
                                                     "new")
    assert unknown == other_unknown != known and "2 documents have no known word" in capsys.readouterr().err
    assert known.startswith("tag3:")


def run_evaluate(*arguments, stdin=""):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *arguments], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_predict_command_reads_standard_input_and_refuses_bad_lines_in_one_line(datasets):
    checkpoint, _ = trained(datasets, "tiny-bow")
    finished = run_evaluate("--checkpoint", str(checkpoint), "--predict", "-", "--top-k", "2", stdin="0:1 1:1\n4:1\n")
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert len(lines) == 2 and lines[0].split(" ")[0].split(":")[0] == "0"  # label 0 owns features 0 and 1
    assert run_evaluate("--checkpoint", str(checkpoint), "--predict", "-").stdout == ""  # no documents
    finished = run_evaluate("--checkpoint", str(checkpoint), "--predict", "-", stdin="0:1\n3:x\n")
    assert finished.returncode == 1 and finished.stderr.strip().startswith("error: <stdin>:2: malformed line")
    assert len(finished.stderr.strip().splitlines()) == 1
    finished = run_evaluate("--checkpoint", str(datasets / "nothing.pt"))
    assert finished.returncode == 1 and finished.stderr.strip() == f"error: no checkpoint at {datasets / 'nothing.pt'}"
    for name, content in (("text.pt", b"not a checkpoint\n"), ("tensor.pt", None)):
        if content is None:
            torch.save(torch.zeros(3), datasets / name)
        else:
            (datasets / name).write_bytes(content)
        finished = run_evaluate("--checkpoint", str(datasets / name), "--predict", "-", stdin="0:1\n")
        assert finished.returncode == 1 and finished.stderr.startswith(f"error: {datasets / name} is not a")
        assert len(finished.stderr.strip().splitlines()) == 1


def test_predict_from_a_folder_or_an_unreadable_file_is_a_one_line_error(datasets, monkeypatch):
    checkpoint, _ = trained(datasets, "tiny-bow")
    finished = run_evaluate("--checkpoint", str(checkpoint), "--predict", str(datasets))
    assert finished.returncode == 1, finished.stderr
    assert finished.stderr.strip() == f"error: {datasets}: cannot be opened (Is a directory)"
    documents = datasets / "documents.txt"
    documents.write_text("0:1\n")
    refuse_to_open(monkeypatch, documents)  # as root, chmod stops no read: fail the open instead
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--checkpoint", str(checkpoint), "--predict", str(documents)])
    with pytest.raises(SystemExit) as stop:
        evaluate.main()
    assert str(stop.value.code) == f"error: {documents}: cannot be opened (Permission denied)"
