"""caches.py: token caches (built once, reused, rebuilt when stale or damaged) and where caches go;
the label-cluster cache is tested with the clusters, in test_data.py."""
import os

import numpy as np

import caches
import data
import xc_files
from conftest import SPLITS, write, write_data_set


def test_token_cache_is_built_once_reused_and_rebuilt_when_stale_or_damaged(tmp_path, tokenizer_dir, monkeypatch, capsys):
    folder = write_data_set(tmp_path / "Set", "raw", SPLITS)
    write(folder / "test_raw_texts.txt", "red apple\nsky [PAD] sea\n" + "pie\n" * 10)
    xmc = xc_files.load(folder)
    monkeypatch.setattr(caches, "TOKENIZE_BATCH", 5)  # several batches
    rows = np.array(caches.token_cache(xmc.test, str(tokenizer_dir), 6, folder))  # a copy: the test damages the file
    tokenizer = caches.load_tokenizer(tokenizer_dir)
    expected = tokenizer(list(xmc.test.texts), max_length=6, truncation=True, padding="max_length", return_tensors="np")
    assert np.array_equal(rows["ids"], expected["input_ids"]) and rows["ids"].dtype == np.uint16
    assert rows["length"].tolist()[:2] == [4, 5]  # [CLS] red apple [SEP]; the [PAD] in the text counts
    batch = data.make_batch(xmc.test, np.array([1, 0]), rows)
    assert batch.tokens["input_ids"].shape == (2, 5)  # padded only as far as the longest document
    assert batch.tokens["attention_mask"].tolist() == [[1] * 5, [1] * 4 + [0]]

    files = list(folder.glob("tokens_*.npy"))
    monkeypatch.setattr(caches, "encode", None)  # a second run must not tokenise again
    assert np.array_equal(caches.token_cache(xmc.test, str(tokenizer_dir), 6, folder), rows)
    monkeypatch.undo()
    monkeypatch.setattr(caches, "TOKENIZE_BATCH", 5)

    files[0].write_bytes(files[0].read_bytes()[:200])  # damaged
    assert np.array_equal(caches.token_cache(xmc.test, str(tokenizer_dir), 6, folder), rows)
    assert "not a valid cache" in capsys.readouterr().out
    write(folder / "test_raw_texts.txt", "blue sky\n" * 12)  # a changed file: a new cache
    fresh = caches.token_cache(xc_files.load(folder).test, str(tokenizer_dir), 6, folder)
    assert fresh["ids"][0, :4].tolist() == tokenizer("blue sky")["input_ids"]
    assert len(list(folder.glob("tokens_*.npy"))) == 2 and not list(folder.glob(".*tmp*"))


def test_a_read_only_data_folder_puts_caches_in_the_fallback(tmp_path):
    xmc = xc_files.load(write_data_set(tmp_path / "Set", "bow", SPLITS))
    assert caches.cache_dir(xmc, tmp_path / "run") == tmp_path / "Set"
    (tmp_path / "Set").chmod(0o555)
    try:
        if not os.access(tmp_path / "Set", os.W_OK):  # root may write anyway
            assert caches.cache_dir(xmc, tmp_path / "run") == tmp_path / "run"
    finally:
        (tmp_path / "Set").chmod(0o755)
    assert caches.cache_dir(data.synthetic(num_train=50, num_test=10), tmp_path / "run") == tmp_path / "run"
