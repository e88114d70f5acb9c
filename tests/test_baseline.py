"""tools/baseline.py's scoring of napkinXC's predictions, with a stand-in for napkinXC (not a dependency):
P@k against brute force on prediction lists that are shorter than 5, as a PLT's can be."""
import sys
import types

import numpy as np
import pytest

import baseline
from conftest import SPLITS, write_data_set


def test_short_prediction_lists_are_scored_as_misses(tmp_path, monkeypatch, capsys):
    pytest.importorskip("scipy")  # napkinXC's dependency, which baseline.py's matrices need
    folder = write_data_set(tmp_path, "bow", SPLITS)  # label ids 0..7 are the files' own: all 8 are in train
    rng = np.random.default_rng(0)
    predictions = [rng.permutation(8)[:n].tolist() for n in rng.integers(1, 6, len(SPLITS["test"]))]
    fitted = {}

    class PLT:  # napkinxc.models.PLT's interface, as baseline.py uses it
        def __init__(self, out):
            pass

        def fit(self, features, labels):
            fitted.update(shape=features.shape, labels=labels)

        def predict(self, features, top_k):
            assert features.shape[0] == len(SPLITS["test"]) and top_k == 5
            return predictions

    monkeypatch.setitem(sys.modules, "napkinxc", types.ModuleType("napkinxc"))
    monkeypatch.setitem(sys.modules, "napkinxc.models", types.SimpleNamespace(PLT=PLT))
    baseline.main(["--data", str(folder), "--out", str(tmp_path / "model")])
    assert fitted["shape"] == (len(SPLITS["train"]), 20) and fitted["labels"] == [l for l, _ in SPLITS["train"]]
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| P ("))
    truth = [set(labels) for labels, _ in SPLITS["test"]]
    expected = [100 * np.mean([len(set(p[:k]) & t) / k for p, t in zip(predictions, truth)]) for k in (1, 3, 5)]
    assert row.split("|")[2:5] == [f" {value:.2f} " for value in expected]


def test_without_napkinxc_it_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "napkinxc", None)  # import napkinxc fails as when it is not installed
    with pytest.raises(SystemExit, match="pip install napkinxc"):
        baseline.main(["--data", str(tmp_path)])
