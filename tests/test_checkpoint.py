"""checkpoint.py: a kill at any moment while checkpoints are written leaves the newest complete one;
--resume through whole runs (exact continuation, also with gradient accumulation and after a damaged
checkpoint, the log trimmed back, another model refused); what a checkpoint saves is every
TrainingState field but those named as not resumed."""
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import data
import train
from conftest import run_until


WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import checkpoint
from pathlib import Path
for count in range(10**6):
    state = {"model_arguments": {}, "epochs_done": 0, "count": count, "payload": torch.full((1 << 20,), count)}
    checkpoint.save_checkpoint(Path(sys.argv[1]) / "checkpoint.pt", state)
    print(count, flush=True)
"""


def test_sigkill_while_writing_checkpoints_always_leaves_the_latest_complete_one(tmp_path):
    generator = np.random.default_rng(0)
    for attempt in range(6):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(Path(checkpoint.__file__).parent)],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline()  # at least one checkpoint was completed
        time.sleep(generator.uniform(0, 0.5))
        writer.send_signal(signal.SIGKILL)
        completed = [int(line) for line in [*writer.stdout, "0"][:-1] if line.strip()]
        writer.wait()
        path, state = checkpoint.load_latest_checkpoint(tmp_path)
        assert torch.equal(state["payload"], torch.full((1 << 20,), state["count"]))  # whole, not half
        assert state["count"] >= max(completed, default=0)  # and the newest one completed


def test_every_training_state_field_is_resumed_or_named_as_not():
    fields = {field.name for field in dataclasses.fields(train.TrainingState)}
    assert set(checkpoint.RESUMED) | set(checkpoint.NOT_RESUMED) == fields
    assert not set(checkpoint.RESUMED) & set(checkpoint.NOT_RESUMED)


def test_resume_continues_exactly(tiny, tmp_path):
    # Bit-identical on the CPU; on a GPU the float atomics of the sparse layer's input gradient
    # add in a varying order, so two runs differ in the last bits even without a resume.
    tiny = dataclasses.replace(tiny, device="cpu")
    straight = dataclasses.replace(tiny, out=str(tmp_path / "straight"))
    train.run(straight)
    interrupted = dataclasses.replace(tiny, out=str(tmp_path / "interrupted"))
    run_until(interrupted, 1)
    train.run(dataclasses.replace(interrupted, resume=True))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)
    for name, tensor in a["network"].items():
        assert torch.equal(tensor, b["network"][name]), name
    assert a["batches_done"] == b["batches_done"]
    logs = [[json.loads(l) for l in open(tmp_path / run / "log.jsonl")] for run in ("straight", "interrupted")]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


def test_a_run_never_overwrites_a_previous_checkpoint(tiny):
    train.run(dataclasses.replace(tiny, epochs=2))
    with pytest.raises(FileExistsError, match="checkpoint.pt exists: pass --resume"):
        train.run(dataclasses.replace(tiny, epochs=1))
    for path in Path(tiny.out).glob("checkpoint*.pt"):
        path.unlink()
    with pytest.raises(FileExistsError, match="log.jsonl exists: pass --resume"):  # nor a log
        train.run(dataclasses.replace(tiny, epochs=1))


def test_resume_falls_back_to_the_previous_checkpoint_and_still_continues_exactly(tiny, tmp_path, capsys):
    tiny = dataclasses.replace(tiny, device="cpu")
    straight = dataclasses.replace(tiny, out=str(tmp_path / "straight"))
    train.run(straight)
    damaged = dataclasses.replace(tiny, out=str(tmp_path / "damaged"))
    run_until(damaged, 2)
    newest = Path(damaged.out) / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:100_000])  # its tail lost
    (Path(damaged.out) / ".checkpoint.pt.tmp999").write_bytes(b"half a checkpoint")  # a killed write
    with open(Path(damaged.out) / "log.jsonl", "a") as log:
        log.write('{"epoch": 3, "lo')  # a half-written line
    capsys.readouterr()
    train.run(dataclasses.replace(damaged, resume=True))
    output = capsys.readouterr().out
    assert "checkpoint.pt is not a readable checkpoint" in output and "after epoch 1 " in output
    assert not list(Path(damaged.out).glob(".*tmp*"))
    a, b = (torch.load(Path(run.out) / "checkpoint.pt", weights_only=True) for run in (straight, damaged))
    for name, tensor in a["network"].items():
        assert torch.equal(tensor, b["network"][name]), name
    logs = [[json.loads(line) for line in open(Path(run.out) / "log.jsonl")] for run in (straight, damaged)]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3] and [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tiny):
    train.run(dataclasses.replace(tiny, epochs=1))
    with pytest.raises(ValueError, match="belongs to another model: fan_in 8 there, 16 here"):
        train.run(dataclasses.replace(tiny, resume=True, fan_in=16))
    with pytest.raises(ValueError, match="num_clusters 8 there, 0 here"):
        train.run(dataclasses.replace(tiny, resume=True, aux_weight=0.0))
    train.run(dataclasses.replace(tiny, resume=True, epochs=2))  # other options may change
    assert json.loads(open(Path(tiny.out) / "log.jsonl").readlines()[-1])["epoch"] == 2


def test_resume_with_gradient_accumulation_continues_exactly_and_keeps_the_scaler(tiny, tmp_path):
    """Windows of 3 batches (19 a epoch: the last window has 1); the gradient scaler's state is in
    the checkpoint and comes back on resume."""
    tiny = dataclasses.replace(tiny, device="cpu", grad_accum=3, rewire_interval=4)
    straight = dataclasses.replace(tiny, out=str(tmp_path / "straight"))
    train.run(straight)
    interrupted = dataclasses.replace(tiny, out=str(tmp_path / "interrupted"))
    run_until(interrupted, 1)
    train.run(dataclasses.replace(interrupted, resume=True))
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("straight", "interrupted"))
    for name, tensor in a["network"].items():
        assert torch.equal(tensor, b["network"][name]), name
    assert a["batches_done"] == b["batches_done"] == 57 and a["schedulers"][0]["last_epoch"] == 3 * 7  # optimizer steps
    clusters = torch.arange(120) % a["model_arguments"]["num_clusters"]
    saving, restored = (train.set_up(tiny, "synthetic", data.synthetic(), clusters, torch.device("cpu")) for _ in "ab")
    saving.scaler = torch.amp.GradScaler("cpu", init_scale=123.0)  # enabled, as fp16 on a GPU has it
    restored.scaler = torch.amp.GradScaler("cpu", init_scale=2**12)
    checkpoint.restore(restored, {**a, "scaler": checkpoint.checkpoint_state(saving, 0, tiny)["scaler"]})
    assert restored.scaler.state_dict()["scale"] == 123.0


def test_step_records_come_at_the_asked_interval_and_a_resume_trims_them(tiny, tmp_path):
    tiny = dataclasses.replace(tiny, device="cpu", log_every=4)
    straight = dataclasses.replace(tiny, out=str(tmp_path / "straight"))
    train.run(straight)
    damaged = dataclasses.replace(tiny, out=str(tmp_path / "damaged"))
    run_until(damaged, 2)
    newest = Path(damaged.out) / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:100_000])  # falls back to epoch 1: epoch 2's records must go
    train.run(dataclasses.replace(damaged, resume=True))
    logs = [[json.loads(line) for line in open(Path(run.out) / "log.jsonl")] for run in (straight, damaged)]
    steps = [r for r in logs[0] if r.get("kind") == "step"]
    assert [r["batch"] for r in steps] == list(range(4, logs[0][-1]["batch"] + 1, 4))
    assert all(r["ms_per_batch"] > 0 and r["documents_per_s"] > 0 and len(r["lr"]) >= 2 for r in steps)

    # a record's loss is the mean over its epoch's batches since the record before: against a run
    # that records every batch (at an interval of 3 too, which epochs do not divide)
    every = dataclasses.replace(tiny, log_every=1, out=str(tmp_path / "every"))
    thirds = dataclasses.replace(tiny, log_every=3, out=str(tmp_path / "thirds"))
    for run in (every, thirds):
        train.run(run)
    single, grouped = ([r for r in map(json.loads, open(Path(run.out) / "log.jsonl")) if r.get("kind")]
                       for run in (every, thirds))
    loss_at = {r["batch"]: r["loss"] for r in single}
    epoch_start = {r["epoch"]: r["batch"] - 1 for r in single[::-1]}  # the batch before each epoch's first
    assert any((r["batch"] - epoch_start[r["epoch"]]) % 3 for r in grouped)  # some window is cut by an epoch
    previous = {}
    for r in grouped:
        start = max(previous.get(r["epoch"], 0), epoch_start[r["epoch"]])
        expected = np.mean([loss_at[b] for b in range(start + 1, r["batch"] + 1)])
        assert r["loss"] == pytest.approx(expected, rel=1e-9), r
        previous[r["epoch"]] = r["batch"]
    assert [r["epoch"] for r in logs[0] if "kind" not in r] == [1, 2, 3]  # the epoch records as before
    same = lambda log: [(r.get("kind"), r["epoch"], r["batch"], r["loss"]) for r in log]
    assert same(logs[0]) == same(logs[1])
