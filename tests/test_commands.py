"""The README's commands as a new user runs them: `--dry-run` on the default run and on every layout,
`--epochs` typed on a small folder, tools/rehearse.py at a tiny size, and runs in new processes,
whose string hashes differ: the same vocabulary and label clusters, and a resumed raw-text run
equal to an uninterrupted one (and a resume over changed texts refused)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from config import Config
from conftest import ROOT, SPLITS, run_until, tiny_bert, write_data_set


def run_main(monkeypatch, capsys, argv):
    """train.py's main as a user runs it, to its end; what it printed."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    train.main()
    return capsys.readouterr().out


@pytest.mark.parametrize("layout", ["synthetic", "bow", "raw", "lf"])
def test_a_dry_run_reports_on_every_layout(tmp_path, monkeypatch, capsys, layout):
    folder = "synthetic" if layout == "synthetic" else str(write_data_set(tmp_path / "Set", layout, SPLITS))
    printed = run_main(monkeypatch, capsys, ["--data", folder, "--dry-run", "--out", str(tmp_path / "run")])
    report = json.loads(printed.split("dry run: ")[-1])
    assert report["token_cache_MB"] == 0 and report["train_documents"] == (30_000 if folder == "synthetic" else 40)
    assert printed.splitlines()[0].startswith("data = ") and "\nrecipe: " in printed


def test_epochs_typed_on_a_small_folder_are_the_epochs_trained(tmp_path, monkeypatch, capsys):
    folder = write_data_set(tmp_path / "Small", "bow", SPLITS)
    run_main(monkeypatch, capsys, ["--data", str(folder), "--epochs", "2", "--dim", "16", "--intermediate", "32",
                                   "--fan-in", "8", "--out", str(tmp_path / "run")])
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "log.jsonl")] == [1, 2]


def in_a_new_process(hash_seed, code, *arguments):
    """Run `code` (with sys.argv[1:] = arguments) in a new Python whose str hashes use `hash_seed`."""
    finished = subprocess.run([sys.executable, "-c", code, *map(str, arguments)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": str(hash_seed)})
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout


def tied_words(directory):
    """A raw-text data set in which 60 words each appear in exactly 2 training documents."""
    rows = [([i % 8, (i * 3) % 8], " ".join(f"word{(3 * i + j) % 60}" for j in range(3))) for i in range(40)]
    return write_data_set(directory, "raw", {"train": rows, "test": SPLITS["test"]})


PREPARE = ("import json, sys, xc_files; xmc, clusters, _, _ = xc_files.prepare(sys.argv[1], 'raw', False, (0.55, 1.5), "
           "False, 'bow', 0, 2, sys.argv[1]); print(json.dumps([xmc.vocabulary, clusters.tolist()]))")


def test_the_vocabulary_and_clusters_are_the_same_whatever_the_hash_seed(tmp_path):
    folder = tied_words(tmp_path / "Tied")
    built = []
    for hash_seed in (1, 2, 3):
        built.append(json.loads(in_a_new_process(hash_seed, PREPARE, folder)))
        for cache in folder.glob("clusters_*.npy"):  # each process builds its own
            cache.unlink()
    vocabulary = built[0][0]
    assert len(vocabulary) == 60 and vocabulary == sorted(vocabulary)  # all tied: alphabetical
    assert built[1] == built[0] and built[2] == built[0]


RUN = ("import os, sys, checkpoint, train; from config import parse_config; save = checkpoint.save_epoch; "
       "checkpoint.save_epoch = lambda out, saved, best: (save(out, saved, best), "  # killed after epoch argv[1]
       "saved['epochs_done'] == int(sys.argv[1]) and os._exit(0)); train.run(parse_config(sys.argv[2:]))")


def test_a_raw_text_run_resumed_under_another_hash_seed_equals_an_uninterrupted_one(tmp_path):
    folder = tied_words(tmp_path / "Tied")
    flags = ["--data", folder, "--epochs", "2", "--dim", "16", "--intermediate", "0", "--fan-in", "4",
             "--batch-size", "8", "--max-leaf", "2", "--warmup-steps", "1", "--rewire-interval", "2",
             "--validation-fraction", "0", "--device", "cpu"]
    in_a_new_process(1, RUN, 0, *flags, "--out", tmp_path / "straight")
    in_a_new_process(1, RUN, 1, *flags, "--out", tmp_path / "resumed")
    in_a_new_process(2, RUN, 0, *flags, "--out", tmp_path / "resumed", "--resume")
    straight, resumed = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)
                         for run in ("straight", "resumed"))
    assert straight["inputs"]["vocabulary"] == resumed["inputs"]["vocabulary"]
    for name, tensor in straight["network"].items():
        assert torch.equal(tensor, resumed["network"][name]), name


def test_a_resume_over_changed_training_texts_is_refused_in_one_line(tmp_path):
    """Another vocabulary numbers the features otherwise: the checkpoint's rows would read other words."""
    folder = write_data_set(tmp_path / "Raw", "raw", SPLITS)
    run = dict(data=str(folder), format="raw", epochs=2, dim=16, intermediate=0, fan_in=4, batch_size=8,
               aux_weight=0.0, device="cpu", out=str(tmp_path / "run"))
    run_until(Config(**run), 1)
    texts = folder / "train_raw_texts.txt"
    texts.write_text(texts.read_text().replace("w19", "w99"))  # as many words, one of them another
    with pytest.raises(ValueError, match=r"belongs to another model: another vocabulary of the training texts"):
        train.run(Config(**run, resume=True))


def test_rehearse_writes_a_shaped_data_set_and_reports_a_first_and_a_cached_start(tmp_path):
    """tools/rehearse.py at a tiny size: amazon670k's shape at 1/1000 of its labels, 40 training documents,
    the tests' tiny BERT (128 wide, for the preset's fan-in) as the tokenizer and encoder."""
    encoder = tiny_bert(tmp_path / "bert", hidden=128)
    finished = subprocess.run([sys.executable, str(ROOT / "tools" / "rehearse.py"), "amazon670k", "--scale", "0.001",
                               "--documents", "40", "--workdir", str(tmp_path), "--encoder", str(encoder)],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    folder = tmp_path / "Amazon-670K"
    assert len((folder / "train_raw_texts.txt").read_text().splitlines()) == 40
    assert len((folder / "train_labels.txt").read_text().splitlines()) == 40
    assert finished.stdout.startswith("amazon670k x 0.001: 40 train / 12 test documents, 670 labels")
    rows = [line.split(" | ") for line in finished.stdout.splitlines() if line.startswith(("| first", "| cached"))]
    assert [row[0] for row in rows] == ["| first", "| cached"]
    assert rows[0][-1] == rows[1][-1]  # the same token cache's size
    assert len(list(folder.glob("tokens_*.npy"))) == 2 and len(list(folder.glob("clusters_*.npy"))) == 1  # built once
