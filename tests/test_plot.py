"""plot.py on the logs and checkpoints of tiny runs: PNGs that open and are not blank."""
import dataclasses
import functools

import matplotlib.image
import pytest

import data
import plot
import train
from config import Config
from conftest import TINY


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A sparse run with step records and a dense run, tiny, trained once for this file."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "synthetic", functools.partial(data.synthetic, **TINY))
        base = Config(epochs=2, dim=32, intermediate=0, fan_in=8, batch_size=32, warmup_steps=5, lr_encoder=1e-3,
                      rewire_interval=10, aux_weight=0.4, aux_epochs=1, max_leaf=20, device="cpu", log_every=5)
        for name, sparse in (("sparse", True), ("dense", False)):
            train.run(dataclasses.replace(base, sparse=sparse, out=str(folder / name)))
    return folder


def assert_picture(path, min_width=600):
    image = matplotlib.image.imread(path)
    assert image.shape[1] >= min_width and image.shape[0] >= 200
    assert image[..., :3].std() > 0.05  # not blank: lines and text on white


def test_curves_of_several_runs(runs, tmp_path):
    out = tmp_path / "curves.png"
    plot.main([str(runs / "sparse"), str(runs / "dense"), "--out", str(out)])
    assert_picture(out)


def test_dst_diagnostics_of_a_sparse_checkpoint(runs, tmp_path):
    out = tmp_path / "dst.png"
    plot.main(["--checkpoint", str(runs / "sparse" / "checkpoint.pt"), "--out", str(out)])
    assert_picture(out)


@pytest.mark.parametrize("arguments, message", [
    (lambda runs: [str(runs / "missing")], "log.jsonl not found"),
    (lambda runs: ["--checkpoint", str(runs / "dense" / "checkpoint.pt")], "dense classifier"),
    (lambda runs: ["--checkpoint", str(runs / "sparse" / "log.jsonl")], "not a readable checkpoint"),
])
def test_bad_input_is_a_one_line_error(runs, tmp_path, arguments, message):
    with pytest.raises(SystemExit, match=message):
        plot.main([*arguments(runs), "--out", str(tmp_path / "x.png")])
