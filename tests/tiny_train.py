"""train.py's command line on the tests' tiny synthetic data set; every process also saves its final
model as <out>/rank<R>.pt, so a test can compare the replicas. Started by test_distributed.py:

    torchrun --standalone --nproc_per_node 2 tests/tiny_train.py --out DIR --device cpu ...

With SLOW_FIRST_START=T, collectives time out after T seconds (NCCL's watchdog, in small) and rank 0
takes 2T to prepare the data (building a large data set's caches on a first start).
"""
import datetime
import functools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY  # noqa: E402  (conftest also puts the project root on sys.path)
import data  # noqa: E402
import train  # noqa: E402
import xc_files  # noqa: E402
from config import parse_config  # noqa: E402

data.synthetic = functools.partial(data.synthetic, **TINY)
built = []
build, train_and_evaluate = train.set_up, train.train_and_evaluate
train.set_up = lambda *args, **kwargs: built.append(build(*args, **kwargs)) or built[-1]


def train_and_save(config, *args):
    """Save this rank's model, then let go of it (and of its DDP wrapper) before run() leaves the
    process group: a DDP model still alive at interpreter exit can abort the process."""
    results = train_and_evaluate(config, *args)
    t = built.pop()
    torch.save({"model": t.network.state_dict(), "results": {k: float(v) for k, v in results.items()}},
               Path(config.out) / f"rank{t.rank}.pt")
    return results


train.train_and_evaluate = train_and_save

if "SLOW_FIRST_START" in os.environ:
    timeout = datetime.timedelta(seconds=float(os.environ["SLOW_FIRST_START"]))
    join, prepare = torch.distributed.init_process_group, xc_files.prepare
    torch.distributed.init_process_group = lambda *args, **kwargs: join(*args, timeout=timeout, **kwargs)

    def slow_prepare(*args, **kwargs):
        if os.environ["RANK"] == "0":
            time.sleep(2 * timeout.total_seconds())
        return prepare(*args, **kwargs)
    xc_files.prepare = slow_prepare
train.run(parse_config())
