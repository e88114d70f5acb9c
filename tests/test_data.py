"""Readers (good and malformed files), the synthetic generator, label clusters and batches."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data

BOW = "3 6 4\n0,2 0:1 3:0.5\n 1:2\n3 5:1 0:1\n"


def write(directory, files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def test_bow_reader_reads_labels_features_and_unlabelled_documents(tmp_path):
    features, values, labels, num_features, num_labels = data.read_bow(write(tmp_path, {"t.txt": BOW}) / "t.txt")
    assert (num_features, num_labels) == (6, 4)
    assert labels == [[0, 2], [], [3]]
    assert features == [[0, 3], [1], [5, 0]] and values == [[1.0, 0.5], [2.0], [1.0, 1.0]]


@pytest.mark.parametrize("text, line, problem", [
    ("3 6\n", 1, "header"),
    ("1 6 4\n0,x 1:1\n", 2, "malformed"),
    ("1 6 4\n0 1:1:2\n", 2, "malformed"),
    ("1 6 4\n0 1-1\n", 2, "malformed"),
    ("1 6 4\n0 1:nan\n", 2, "not a finite number"),
    ("1 6 4\n0 7:1\n", 2, "id 7 out of range"),
    ("1 6 4\n4 1:1\n", 2, "id 4 out of range"),
    ("2 6 4\n0 1:1\n", None, "header says 2 documents"),
])
def test_bow_reader_names_file_line_and_problem(tmp_path, text, line, problem):
    path = write(tmp_path, {"bad.txt": text}) / "bad.txt"
    with pytest.raises(data.DataError, match=f"{path}{':' + str(line) if line else ''}.*{problem}"):
        data.read_bow(path)


def test_bow_reader_takes_crlf_and_refuses_undecodable_bytes_and_empty_files(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(BOW.replace("\n", "\r\n").encode())
    assert data.read_bow(path)[2] == [[0, 2], [], [3]]
    path.write_bytes(b"1 6 4\n0 1:0.\xff5\n")
    with pytest.raises(data.DataError, match=f"{path}:2: malformed line"):
        data.read_bow(path)
    path.write_bytes(b"")
    with pytest.raises(data.DataError, match=f"{path}:1: expected a header"):
        data.read_bow(path)


def test_raw_text_reader_maps_label_names_and_drops_unseen_test_labels(tmp_path, capsys):
    directory = write(tmp_path / "Tiny", {
        "train_raw_texts.txt": "red apple pie\ngreen apple\nblue sky\n",
        "train_labels.txt": "fruit food\nfruit\nsky\n",
        "test_raw_texts.txt": "apple sky\n",
        "test_labels.txt": "fruit weather\n",
    })
    xmc = data.load_raw_text(directory, "tiny")
    assert xmc.label_names == ["fruit", "food", "sky"] and xmc.num_labels == 3
    assert [xmc.train.labels_of(i).tolist() for i in range(3)] == [[0, 1], [0], [2]]
    assert xmc.test.labels_of(0).tolist() == [0]
    assert "1 test labels never occur in training" in capsys.readouterr().out
    assert xmc.train.texts[2] == "blue sky"


def test_raw_text_lines_survive_a_missing_final_newline_and_stray_carriage_returns(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"one\rstill one\r\ntwo")
    assert data.read_lines(path) == ["one\rstill one", "two"]
    path.write_text("")
    assert data.read_lines(path) == []


def test_raw_text_reader_refuses_unpaired_files(tmp_path):
    directory = write(tmp_path / "Tiny", {"train_raw_texts.txt": "a\nb\n", "train_labels.txt": "x\n",
                                          "test_raw_texts.txt": "a\n", "test_labels.txt": "x\n"})
    with pytest.raises(data.DataError, match="train_labels.txt: 1 lines, but train_raw_texts.txt has 2"):
        data.load_raw_text(directory, "tiny")


def test_missing_data_set_says_which_files_and_where_from(tmp_path):
    with pytest.raises(data.DataError) as error:
        data.load("amazon670k", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "Amazon-670K" / "train_raw_texts.txt") in message
    assert "test_labels.txt" in message and "Extreme Classification Repository" in message
    with pytest.raises(data.DataError, match="unknown data set"):
        data.load("imagenet", tmp_path)


def test_bags_are_l2_normalised_tfidf():
    offsets, ids, values, idf = data.tfidf_bags(np.array([0, 3, 5]), np.array([1, 1, 2, 2, 0]), 4)
    assert ids.tolist() == [1, 2, 0, 2] and offsets.tolist() == [0, 2, 4]
    assert np.allclose(idf, np.log(3 / (1 + np.array([1, 1, 2, 0]))) + 1)  # document frequencies 1, 1, 2, 0
    norms = np.sqrt(np.add.reduceat(values.astype(np.float64) ** 2, offsets[:-1]))
    assert np.allclose(norms, 1)
    assert values[0] > values[1]  # token 1 occurs twice and in fewer documents than token 2


def test_other_documents_are_weighted_by_the_training_idf():
    """Token 0 is in all 5 training documents; one new document's bag must use the training idf
    (log(6/6) + 1 = 1), not a mix of its own count and the training frequencies (log(2/6) + 1 < 0)."""
    _, _, _, idf = data.tfidf_bags(np.arange(6), np.zeros(5, dtype=np.int64), 3)
    offsets, ids, values, _ = data.tfidf_bags(np.array([0, 2]), np.array([0, 1]), 3, idf)
    expected = np.log1p(1) * np.array([1.0, np.log(6 / 1) + 1])
    assert ids.tolist() == [0, 1] and np.allclose(values, expected / np.linalg.norm(expected))


def test_synthetic_data_is_deterministic_and_power_law():
    small = dict(num_labels=400, num_topics=10, vocabulary=1000, num_train=3000, num_test=500)
    first, second = data.synthetic(**small), data.synthetic(**small)
    assert np.array_equal(first.train.label_ids, second.train.label_ids)
    assert np.array_equal(first.test.bag_values, second.test.bag_values)
    frequencies = np.sort(first.label_frequencies())[::-1]
    assert frequencies[:40].sum() > frequencies[200:].sum()  # the head outweighs the tail
    per_document = np.diff(first.train.label_offsets)
    assert per_document.min() >= 1 and 1.5 < per_document.mean() < 4


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 600), st.integers(2, 60), st.integers(0, 1000))
def test_clusters_cover_every_label_and_respect_max_leaf(num_labels, max_leaf, seed):
    embeddings = torch.nn.functional.normalize(torch.randn(num_labels, 8, generator=torch.Generator().manual_seed(seed)), dim=1)
    assignment = data.cluster_labels(embeddings, max_leaf)
    sizes = np.bincount(assignment.numpy())
    assert len(assignment) == num_labels and sizes.min() >= 1 and sizes.max() <= max_leaf
    assert sizes.max() - sizes.min() <= max(1, sizes.max() // 2 + 1)  # balanced splits


def test_clusters_group_labels_of_the_same_documents(tmp_path):
    """Labels 0-3 always co-occur on feature 0, labels 4-7 on feature 1: PIFA puts them apart."""
    labels = [[0, 1, 2, 3]] * 20 + [[4, 5, 6, 7]] * 20
    features = [[0]] * 20 + [[1]] * 20
    split = data.split_from_bow(features, [[1.0]] * 40, labels)
    xmc = data.XMCData("toy", split, split, 2, 8, None)
    assignment = data.label_clusters(xmc, max_leaf=4, cache_dir=tmp_path)
    assert len(set(assignment[:4].tolist())) == 1 and len(set(assignment[4:].tolist())) == 1
    assert assignment[0] != assignment[4]
    assert torch.equal(data.label_clusters(xmc, max_leaf=4, cache_dir=tmp_path), assignment)  # from the cache
    assert len(list(tmp_path.glob("clusters_toy_4_*.npy"))) == 1


def test_batches_carry_each_documents_positives_and_bags():
    xmc = data.synthetic(num_labels=50, num_topics=5, vocabulary=200, num_train=37, num_test=5)
    seen = []
    for batch in data.batches(xmc.train, 8, shuffle=True, seed=3, epoch=1):
        assert batch.bag_offsets.tolist()[0] == 0 and len(batch.bag_offsets) == batch.size
        seen.append(batch)
    order = np.random.default_rng([3, 1]).permutation(37)
    rows = np.concatenate([np.arange(b.size) + 8 * i for i, b in enumerate(seen)])
    assert len(rows) == 37
    for i, batch in enumerate(seen):
        for row in range(batch.size):
            document = order[8 * i + row]
            positives = batch.positive_labels[batch.positive_rows == row].tolist()
            assert positives == xmc.train.labels_of(document).tolist()
    other_epoch = next(data.batches(xmc.train, 8, shuffle=True, seed=3, epoch=2))
    assert not torch.equal(other_epoch.positive_labels, seen[0].positive_labels)


def test_ranks_share_each_global_batch_as_one_process_would_see_it():
    xmc = data.synthetic(num_labels=50, num_topics=5, vocabulary=200, num_train=103, num_test=5)
    single = list(data.batches(xmc.train, 12, shuffle=True, seed=1, epoch=4))
    shares = [list(data.batches(xmc.train, 4, shuffle=True, seed=1, epoch=4, rank=r, world=3, even=True))
              for r in range(3)]
    assert [len(s) for s in shares] == [9, 9, 9] and [b.size for b in shares[2]] == [4] * 8 + [2]
    documents = lambda batch: sorted(map(tuple, np.split(batch.bag_ids.numpy(), batch.bag_offsets[1:].numpy())))
    for number, whole in enumerate(single[:-1]):
        assert documents(whole) == sorted(sum((documents(share[number]) for share in shares), []))
    order = np.random.default_rng([1, 4]).permutation(103)  # the last batch: 7 documents, of which
    kept = data.make_batch(xmc.train, order[96:102])  # the first 6 are kept (even: 102 = 3 * 34)
    assert documents(kept) == sorted(sum((documents(share[-1]) for share in shares), []))
