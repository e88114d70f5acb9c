"""checkpoint.py: a kill at any moment while checkpoints are written leaves the newest complete one
(resume, fallback and compatibility are tested through whole runs in test_train.py)."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint


WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import checkpoint
from pathlib import Path
for count in range(10**6):
    state = {"model_arguments": {}, "max_length": None, "count": count, "payload": torch.full((1 << 20,), count)}
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
