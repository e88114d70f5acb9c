"""Data-parallel training under torchrun: 2 CPU processes (gloo) against 1 process, same global batch
(with a mean and with a summed loss); a slow first start on rank 0 outlasts no collective's timeout."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_bert

HELPER = Path(__file__).resolve().parent / "tiny_train.py"
# Two epochs of 19 batches, whose gradients add up in windows of 3 (DDP synchronises only at a
# window's last batch): the aux loss is on in the first epoch, off in the second (an idle meta head
# under DDP), and the classifier is rewired after batches 6, 12 and 18 (rewiring ends with epoch
# int(0.66 * 2) = 1). No dropout, so that one process and two draw the same function.
FLAGS = ["--epochs", "2", "--dim", "32", "--intermediate", "64", "--fan-in", "8", "--batch-size", "32",
         "--grad-accum", "3", "--warmup-steps", "5", "--rewire-interval", "6", "--aux-weight", "0.4",
         "--aux-epochs", "1", "--max-leaf", "20", "--dropout", "0", "--device", "cpu"]


def launch(command, out, flags=FLAGS, environment=None):
    finished = subprocess.run(command + ["--out", str(out)] + flags, capture_output=True, text=True, timeout=600,
                              env={**os.environ, **(environment or {})})
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER)]


# The summed BCE with SGD (lf-amazontitles-131k's): each process sums over its half of the batch,
# DDP averages the two halves' gradients, so without a correction 2 processes train at half the rate.
@pytest.mark.parametrize("loss", [[], ["--loss", "bce", "--classifier-optimizer", "sgd"]], ids=["mean", "sum"])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, loss):
    output = launch(TORCHRUN, tmp_path / "two", FLAGS + loss)
    launch([sys.executable, str(HELPER)], tmp_path / "one", FLAGS + loss)

    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, tensor in ranks[0]["model"].items():  # replicas: the same bits, indices included
        assert torch.equal(tensor, ranks[1]["model"][name]), name
    assert ranks[0]["results"] == ranks[1]["results"]  # metrics gathered from both shares of the test split

    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    indices = "classifier.indices"
    assert ranks[0]["model"][indices].equal(single["model"][indices])  # the same rewiring
    for name, tensor in single["model"].items():
        torch.testing.assert_close(ranks[0]["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for metric, value in single["results"].items():
        assert abs(ranks[0]["results"][metric] - value) < 0.5, metric  # a near-tie may flip one ranking

    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("two", "one")]
    assert len(logs[0]) == 2 and [r["rewired"] for r in logs[0]] == [r["rewired"] for r in logs[1]]
    assert logs[1][0]["rewired"] > 0 and logs[1][1]["rewired"] == 0
    for two, one in zip(*logs):
        assert abs(two["loss"] - one["loss"]) < 1e-5 * one["loss"]  # the global batch's loss, not one share's
    assert output.count("epoch 1:") == 1  # only rank 0 prints
    assert sorted(p.name for p in (tmp_path / "two").glob("*checkpoint*")) == ["checkpoint.best.pt",
                                                                               "checkpoint.previous.pt", "checkpoint.pt"]


def test_a_transformer_without_the_aux_loss_trains_under_torchrun(tmp_path):
    """The pretrained model's pooler never gets a gradient, which DDP refuses at the second step;
    the encoder is loaded without it. 2 processes against 1, a tiny local BERT, aux loss off, the
    loss a run of labels at a time (autograd, not .grad in place, delivers its weight gradient)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "Tiny"
    folder.mkdir()
    for split, count in (("train", 64), ("test", 16)):
        texts = [" ".join(rng.choice("red green blue apple pie sky sea fruit".split(), 4)) for _ in range(count)]
        (folder / f"{split}_raw_texts.txt").write_text("".join(t + "\n" for t in texts))
        (folder / f"{split}_labels.txt").write_text("".join(t.split()[0].upper() + "\n" for t in texts))
    flags = ["--data", str(folder), "--encoder", str(tiny_bert(tmp_path / "bert")), "--max-length", "8",
             "--epochs", "2", "--batch-size", "16", "--fan-in", "4", "--aux-weight", "0", "--dropout", "0",
             "--rewire-interval", "2", "--warmup-steps", "1", "--device", "cpu", "--loss-in-runs"]
    launch(TORCHRUN, tmp_path / "two", flags)
    launch([sys.executable, str(HELPER)], tmp_path / "one", flags)
    two, one = (torch.load(tmp_path / run / "rank0.pt", weights_only=True) for run in ("two", "one"))
    assert two["model"]["classifier.indices"].equal(one["model"]["classifier.indices"])
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_slow_first_start_on_rank_0_outlasts_no_collectives_timeout(tmp_path):
    """Rank 0 prepares the data (a first start at Wiki-500K builds caches for 24 minutes) for twice
    the collectives' timeout (NCCL's is 10 minutes) while rank 1 waits for it; the run goes on."""
    output = launch(TORCHRUN, tmp_path / "two", FLAGS + ["--epochs", "1"], {"SLOW_FIRST_START": "5"})
    assert "epoch 1:" in output
