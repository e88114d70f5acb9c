"""train.py's command line on the tests' tiny synthetic data set; every process also saves its final
model as <out>/rank<R>.pt, so a test can compare the replicas. Started by test_distributed.py:

    torchrun --standalone --nproc_per_node 2 tests/tiny_train.py --out DIR --device cpu ...
"""
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY  # noqa: E402  (conftest also puts the project root on sys.path)
import data  # noqa: E402
import train  # noqa: E402
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
train.run(parse_config())
