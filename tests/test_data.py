"""data.py against independent references: tf-idf bags and streamed PIFA vectors against dense
matrices, label clusters, the synthetic generator, and batches (also as ranks of one process)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import caches
import data
import xc_files
from conftest import SPLITS, write, write_data_set


def labels_of(split):
    return [split.labels_of(i).tolist() for i in range(len(split))]


def dense_tfidf(texts, vocabulary, idf):
    """[N, V] float64: log(1 + count) * idf per word, rows L2-normalised (plain loops)."""
    bags = np.zeros((len(texts), len(vocabulary)))
    for row, text in enumerate(texts):
        for word in data.WORD.findall(text.lower()):
            if word in vocabulary:
                bags[row, vocabulary.index(word)] += 1
    bags = np.log1p(bags) * idf
    return bags / np.maximum(np.linalg.norm(bags, axis=1, keepdims=True), 1e-12)


def test_text_bags_and_streamed_pifa_match_dense_references(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_DOCUMENTS", 7)  # several chunks
    xmc = xc_files.load(write_data_set(tmp_path / "Set", "raw", SPLITS))
    streamed = data.pifa_embeddings(xmc, dim=16)  # from the texts, a chunk at a time
    texts = list(xmc.train.texts)
    document_frequency = {w: sum(w in data.WORD.findall(t) for t in texts) for w in xmc.vocabulary}
    assert sorted(document_frequency.values(), reverse=True) == [document_frequency[w] for w in xmc.vocabulary]
    expected_idf = np.log(41 / (1 + np.array([document_frequency[w] for w in xmc.vocabulary]))) + 1
    assert np.allclose(xmc.feature_weights, expected_idf)

    data.attach_bags(xmc)
    bags = np.zeros((40, xmc.num_features))
    rows = np.repeat(np.arange(40), np.diff(xmc.train.bag_offsets))
    bags[rows, xmc.train.bag_ids] = xmc.train.bag_values
    assert np.allclose(bags, dense_tfidf(texts, xmc.vocabulary, expected_idf), atol=1e-6)

    labels = np.zeros((40, 8))
    labels[np.repeat(np.arange(40), np.diff(xmc.train.label_offsets)), xmc.train.label_ids] = 1
    projection = torch.randn(xmc.num_features, 16, generator=torch.Generator().manual_seed(0)).double() / 4
    pifa = torch.from_numpy(labels.T @ bags) @ projection  # Y^T X R, dense, float64
    expected = torch.nn.functional.normalize(pifa, dim=1)
    assert torch.allclose(streamed.double(), expected, atol=1e-5)
    assert torch.allclose(data.pifa_embeddings(xmc, dim=16).double(), expected, atol=1e-5)  # from the bags


def test_bags_are_l2_normalised_tfidf():
    offsets, ids, values, idf = data.tfidf_bags(np.array([0, 3, 5]), np.array([1, 1, 2, 2, 0]), 4)
    assert ids.tolist() == [1, 2, 0, 2] and offsets.tolist() == [0, 2, 4]
    assert np.allclose(idf, [np.log(3 / 2) + 1, np.log(3 / 2) + 1, np.log(3 / 3) + 1, 0])  # document frequencies 1, 1, 2, 0
    norms = np.sqrt(np.add.reduceat(values.astype(np.float64) ** 2, offsets[:-1]))
    assert np.allclose(norms, 1)
    assert values[0] > values[1]  # token 1 occurs twice and in fewer documents than token 2


def test_other_documents_are_weighted_by_the_training_idf():
    """Token 0 is in all 5 training documents; one new document's bag must use the training idf
    (log(6/6) + 1 = 1), not a mix of its own count and the training frequencies (log(2/6) + 1 < 0);
    token 1, in none of them, weighs 0 (its embedding was never trained)."""
    _, _, _, idf = data.tfidf_bags(np.arange(6), np.zeros(5, dtype=np.int64), 3)
    offsets, ids, values, _ = data.tfidf_bags(np.array([0, 2]), np.array([0, 1]), 3, idf)
    assert ids.tolist() == [0, 1] and np.allclose(values, [1, 0])  # token 1 is in no training document: idf 0


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


def test_clusters_group_labels_of_the_same_documents_and_are_cached(tmp_path, capsys):
    """Labels 0-3 always co-occur on feature 0, labels 4-7 on feature 1: PIFA puts them apart."""
    folder = tmp_path / "Toy"
    lines = ["0,1,2,3 0:1"] * 20 + ["4,5,6,7 1:1"] * 20
    write(folder / "train.txt", f"40 2 8\n" + "\n".join(lines) + "\n")
    write(folder / "test.txt", "1 2 8\n0 0:1\n")
    xmc = xc_files.load(folder)
    assignment = caches.label_clusters(xmc, max_leaf=4, cache_dir=folder)
    assert len(set(assignment[:4].tolist())) == 1 and len(set(assignment[4:].tolist())) == 1
    assert assignment[0] != assignment[4]
    cache = list(folder.glob("clusters_4_*.npy"))
    assert len(cache) == 1
    cache[0].write_bytes(cache[0].read_bytes()[:50])  # damaged: rebuilt, never trusted
    assert torch.equal(caches.label_clusters(xmc, max_leaf=4, cache_dir=folder), assignment)
    assert "not a valid cache; rebuilding it" in capsys.readouterr().out
    assert torch.equal(torch.from_numpy(np.load(cache[0])), assignment) and not list(folder.glob(".*tmp*"))


# ---------------------------------------------------------------------------------------------
# Token caches.


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


def test_hold_out_is_a_seeded_disjoint_share_of_the_training_documents():
    xmc = data.synthetic(num_labels=50, num_topics=5, vocabulary=200, num_train=200, num_test=20)
    data.hold_out(xmc, 0.1, seed=3)
    assert len(xmc.validation) == 20 and len(xmc.fit) == 180
    assert sorted(set(xmc.validation) | set(xmc.fit)) == list(range(200)) and not set(xmc.validation) & set(xmc.fit)
    assert list(xmc.validation) == sorted(xmc.validation) and list(xmc.fit_rows()) == list(xmc.fit)
    held = xmc.validation.copy()
    data.hold_out(xmc, 0.1, seed=3)
    assert np.array_equal(xmc.validation, held)  # the same every run (resume rebuilds it)
    data.hold_out(xmc, 0.1, seed=4)
    assert not np.array_equal(xmc.validation, held)
    frequencies = xmc.label_frequencies()
    assert frequencies.sum() == len(xmc.train.label_ids)  # propensities: the whole training split's
    data.hold_out(xmc, 0.0, seed=3)
    assert xmc.validation is None and list(xmc.fit_rows()) == list(range(200))
    for fraction in (-0.1, 1.0):
        with pytest.raises(ValueError, match="validation-fraction"):
            data.hold_out(xmc, fraction, seed=0)
    one = data.synthetic(num_labels=5, num_topics=1, vocabulary=20, num_train=1, num_test=2)
    with pytest.raises(data.DataError, match="too few"):
        data.hold_out(one, 0.5, seed=0)


def test_batches_of_chosen_rows_take_exactly_those_documents():
    xmc = data.synthetic(num_labels=50, num_topics=5, vocabulary=200, num_train=60, num_test=20)
    rows = np.array([1, 4, 9, 16, 25, 36, 49])
    in_order = [b for b in data.batches(xmc.train, 3, rows=rows)]
    positives = [labels for b in in_order for labels in
                 [b.positive_labels[b.positive_rows == r].tolist() for r in range(b.size)]]
    assert positives == [sorted(xmc.train.labels_of(r).tolist()) for r in rows]
    shuffled = [b.size for b in data.batches(xmc.train, 3, shuffle=True, seed=0, epoch=1, rows=rows)]
    assert shuffled == [3, 3, 1]
    everything = next(data.batches(xmc.train, 60, shuffle=True, seed=2, epoch=0))
    same = next(data.batches(xmc.train, 60, shuffle=True, seed=2, epoch=0, rows=np.arange(60)))
    assert torch.equal(everything.positive_labels, same.positive_labels)  # rows=all: the order of before
