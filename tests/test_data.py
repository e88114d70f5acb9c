"""Readers (every layout, gzipped or not, good and malformed files), the release's label ids,
filtered evaluation and label-text augmentation, bags of words and clusters (against dense
references), token caches, the synthetic generator and batches."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
import evaluate
from conftest import SPLITS, FixedScores, tiny_bert, write, write_data_set

BOW = "3 6 4\n0,2 0:1 3:0.5\n 1:2\n3 5:1 0:1\n"


def labels_of(split):
    return [split.labels_of(i).tolist() for i in range(len(split))]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["bow", "raw", "attentionxml", "lf", "lf-under-raw_text"])
def test_every_layout_gives_the_same_documents_and_labels(tmp_path, layout, gz):
    folder = write_data_set(tmp_path / "Set", layout, SPLITS, gz)
    assert data.detect(folder)[0] == layout.split("-")[0].replace("attentionxml", "raw")
    xmc = data.load(folder)
    assert xmc.num_labels == 8 and labels_of(xmc.train) == [labels for labels, _ in SPLITS["train"]]
    assert labels_of(xmc.test) == [labels for labels, _ in SPLITS["test"]]
    if layout != "bow":
        assert list(xmc.test.texts) == [text for _, text in SPLITS["test"]]
        assert xmc.label_names == [f"L{l:02d}" for l in range(8)]
    data.attach_bags(xmc)  # a text data set gets its bags from the texts, a bow one has them
    assert len(xmc.train.bag_offsets) == 41 and xmc.train.bag_ids.dtype == np.int32


def test_a_folder_with_two_layouts_is_read_as_the_encoder_needs_unless_forced(tmp_path):
    folder = write_data_set(write_data_set(tmp_path / "Set", "bow", SPLITS), "raw", SPLITS)
    assert data.detect(folder)[0] == "bow"  # the bag-of-words encoder: the repository's own features
    assert data.detect(folder, prefer_text=True)[0] == "raw"  # a transformer needs texts
    assert data.detect(folder, format="raw")[0] == "raw"


def test_missing_or_incomplete_data_sets_say_which_files_and_where_from(tmp_path):
    with pytest.raises(data.DataError) as error:
        data.detect(data.locate("amazon670k", tmp_path), format="raw")
    assert str(tmp_path / "Amazon-670K") in str(error.value) and "Extreme Classification Repository" in str(error.value)
    assert "train_raw_texts.txt or train_texts.txt + train_labels.txt" in str(error.value)
    (tmp_path / "Empty").mkdir()
    with pytest.raises(data.DataError, match="no data set in .*Empty: expected train.txt"):
        data.detect(tmp_path / "Empty")
    folder = write_data_set(tmp_path / "Half", "raw", SPLITS)
    (folder / "test_labels.txt").unlink()
    with pytest.raises(data.DataError, match="Half: missing test_labels.txt"):
        data.detect(folder)
    with pytest.raises(data.DataError, match="no data set in .*Half: expected"):
        data.detect(folder, format="lf")
    with pytest.raises(data.DataError, match="unknown data set 'imagenet'"):
        data.locate("imagenet")


def test_label_ids_are_the_sorted_union_and_a_test_only_label_keeps_its_row_and_counts(tmp_path, capsys):
    """The release's convention: 'zeta' occurs only in the test split; it is a label all the same
    (L = 3), a right prediction of it counts in P@k, and with no training document its 1/p is the
    largest, so PSP@k rewards it most."""
    folder = tmp_path / "Tiny"
    write(folder / "train_raw_texts.txt", "red apple pie\ngreen apple\nblue sky\n")
    write(folder / "train_labels.txt", "fruit food\nfruit\nfood\n")
    write(folder / "test_raw_texts.txt", "apple sky\n")
    write(folder / "test_labels.txt", "zeta fruit\n")
    xmc = data.load(folder)
    assert xmc.label_names == ["food", "fruit", "zeta"] and xmc.num_labels == 3
    assert labels_of(xmc.train) == [[0, 1], [1], [0]] and labels_of(xmc.test) == [[1, 2]]
    assert "1 labels have no training document" in capsys.readouterr().out
    inverse = evaluate.inverse_propensities(xmc.label_frequencies(), len(xmc.train))
    assert inverse[2] == inverse.max()
    right = evaluate.metrics(np.array([[2, 1, 0]]), xmc.test.label_offsets, xmc.test.label_ids, inverse)
    wrong = evaluate.metrics(np.array([[1, 0, 2]]), xmc.test.label_offsets, xmc.test.label_ids, inverse)
    assert right["P@1"] == wrong["P@1"] == 100 and right["PSP@1"] == 100 > wrong["PSP@1"]


def lf_files(folder, **extra):
    write_data_set(folder, "lf", SPLITS)
    for name, text in extra.items():
        write(folder / name, text)
    return folder


def test_lf_augmentation_adds_one_document_per_label_title(tmp_path):
    folder = lf_files(tmp_path / "LF-Tiny")
    plain, augmented = data.load(folder), data.load(folder, augment_labels=True)
    assert len(augmented.train) == len(plain.train) + 8 and len(augmented.test) == len(plain.test)
    assert labels_of(augmented.train)[40:] == [[l] for l in range(8)]
    assert list(augmented.train.texts)[40:] == [f"w{l} w{l}" for l in range(8)]
    assert np.array_equal(augmented.label_frequencies(), plain.label_frequencies() + 1)  # counted in propensities
    with pytest.raises(data.DataError, match="only LF data sets"):
        data.load(write_data_set(tmp_path / "Raw", "raw", SPLITS), augment_labels=True)


def test_lf_text_key_follows_the_data_set_name(tmp_path):
    for name, expected in (("LF-ShopTitles-1K", "title"), ("LF-Wiki-1K", "content")):
        folder = tmp_path / name
        write(folder / "trn.json", json.dumps({"title": "the title", "content": "the content", "target_ind": [0]}) + "\n")
        write(folder / "tst.json", json.dumps({"title": "the title", "content": "the content", "target_ind": [0]}) + "\n")
        write(folder / "lbl.json", json.dumps({"title": "a label"}) + "\n")
        assert list(data.load(folder).train.texts) == [f"the {expected}"]


def test_filtered_evaluation_takes_the_filter_pairs_out_of_each_ranking(tmp_path):
    pairs = [(0, 3), (0, 5), (4, 0), (11, 7)]
    folder = lf_files(tmp_path / "LF-Tiny", **{"filter_labels_test.txt": "".join(f"{d} {l}\n" for d, l in pairs)})
    xmc = data.load(folder)
    scores = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    labels, _ = evaluate.predict_top_k(FixedScores(scores), data.batches(xmc.test, 5), 5, "cpu")
    for document in range(12):  # brute force: the ranking without the document's filtered labels
        ranking = [l for l in scores[document].argsort(descending=True).tolist() if (document, l) not in pairs]
        assert labels[document].tolist() == ranking[:5]


@pytest.mark.parametrize("name, text, problem", [
    ("trn.json", '{"title": "a", "target_ind": [0]\n', "trn.json:1: malformed JSON"),
    ("trn.json", '{"title": "a", "target_ind": [0]}\n{"title": "b"}\n', "trn.json:2: no 'target_ind' key"),
    ("trn.json", '{"title": "a", "target_ind": [0, 9]}\n', "trn.json:1: target id 9 out of range .lbl.json has 8"),
    ("trn.json", '{"title": "a", "target_ind": ["x"]}\n', "trn.json:1: target_ind is not a list of integers"),
    ("lbl.json", '{"uid": "L0"}\n', "lbl.json:1: no 'title' key"),
    ("filter_labels_test.txt", "0 1\n2\n", "filter_labels_test.txt:2: expected two integers"),
    ("filter_labels_test.txt", "0 1 2 3\n", "filter_labels_test.txt:1: expected two integers"),
    ("filter_labels_test.txt", "12 1\n", r"filter_labels_test.txt:1: pair \(12, 1\) out of range"),
])
def test_malformed_lf_files_are_one_line_errors_with_file_and_line(tmp_path, name, text, problem):
    folder = lf_files(tmp_path / "LF-Tiny-titles")
    write(folder / name, text)
    with pytest.raises(data.DataError, match=problem):
        data.load(folder)


def test_a_gzip_file_cut_short_is_an_error_with_file_and_line(tmp_path):
    folder = write_data_set(tmp_path / "Set", "raw", SPLITS, gz=True)
    labels = folder / "train_labels.txt.gz"
    labels.write_bytes(labels.read_bytes()[:-30])
    with pytest.raises(data.DataError, match=r"train_labels.txt.gz:\d+: cannot be read .* damaged or cut short"):
        data.load(folder)
    texts = folder / "test_raw_texts.txt.gz"
    texts.write_bytes(b"not gzip at all\n")
    labels.unlink()
    write_data_set(tmp_path / "Set", "raw", {"train": SPLITS["train"]}, gz=True)
    with pytest.raises(data.DataError, match="test_raw_texts.txt.gz:1: cannot be read"):
        list(data.load(folder).test.texts)


def test_texts_and_labels_must_pair_line_by_line(tmp_path):
    folder = write_data_set(tmp_path / "Set", "raw", SPLITS)
    write(folder / "train_raw_texts.txt", "".join(text + "\n" for _, text in SPLITS["train"][:-1]))
    with pytest.raises(data.DataError, match="train_raw_texts.txt: 39 texts for 40 label lines"):
        data.attach_bags(data.load(folder))


def test_bow_reader_reads_labels_features_and_unlabelled_documents(tmp_path):
    split, num_features, num_labels = data.read_bow(write(tmp_path / "t.txt", BOW))
    assert (num_features, num_labels) == (6, 4) and labels_of(split) == [[0, 2], [], [3]]
    assert split.bag_ids.tolist() == [0, 3, 1, 5, 0] and split.bag_offsets.tolist() == [0, 2, 3, 5]
    assert np.allclose(split.bag_values, [1 / 1.25 ** 0.5, 0.5 / 1.25 ** 0.5, 1, 2 ** -0.5, 2 ** -0.5])


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
    path = write(tmp_path / "bad.txt", text)
    with pytest.raises(data.DataError, match=f"{path}{':' + str(line) if line else ''}.*{problem}"):
        data.read_bow(path)


def test_bow_reader_takes_crlf_and_refuses_undecodable_bytes_and_empty_files(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(BOW.replace("\n", "\r\n").encode())
    assert labels_of(data.read_bow(path)[0]) == [[0, 2], [], [3]]
    path.write_bytes(b"\xef\xbb\xbf" + BOW.encode())  # a byte-order mark, as some editors write
    assert labels_of(data.read_bow(path)[0]) == [[0, 2], [], [3]]
    path.write_bytes(b"1 6 4\n0 1:0.\xff5\n")
    with pytest.raises(data.DataError, match=f"{path}:2: malformed line"):
        data.read_bow(path)
    path.write_bytes(b"")
    with pytest.raises(data.DataError, match=f"{path}:1: expected a header"):
        data.read_bow(path)


def test_lines_survive_a_missing_final_newline_and_stray_carriage_returns(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"one\rstill one\r\ntwo")
    assert list(data.read_lines(path)) == [(1, "one\rstill one"), (2, "two")]
    path.write_text("")
    assert list(data.read_lines(path)) == []


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
    xmc = data.load(write_data_set(tmp_path / "Set", "raw", SPLITS))
    streamed = data.pifa_embeddings(xmc, dim=16)  # from the texts, a chunk at a time
    texts = list(xmc.train.texts)
    document_frequency = {w: sum(w in data.WORD.findall(t) for t in texts) for w in xmc.vocabulary}
    assert sorted(document_frequency.values(), reverse=True) == [document_frequency[w] for w in xmc.vocabulary]
    expected_idf = np.log(41 / (1 + np.array([document_frequency[w] for w in xmc.vocabulary]))) + 1
    assert np.allclose(xmc.idf, expected_idf)

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


def test_clusters_group_labels_of_the_same_documents_and_are_cached(tmp_path, capsys):
    """Labels 0-3 always co-occur on feature 0, labels 4-7 on feature 1: PIFA puts them apart."""
    folder = tmp_path / "Toy"
    lines = ["0,1,2,3 0:1"] * 20 + ["4,5,6,7 1:1"] * 20
    write(folder / "train.txt", f"40 2 8\n" + "\n".join(lines) + "\n")
    write(folder / "test.txt", "1 2 8\n0 0:1\n")
    xmc = data.load(folder)
    assignment = data.label_clusters(xmc, max_leaf=4, cache_dir=folder)
    assert len(set(assignment[:4].tolist())) == 1 and len(set(assignment[4:].tolist())) == 1
    assert assignment[0] != assignment[4]
    cache = list(folder.glob("clusters_4_*.npy"))
    assert len(cache) == 1
    cache[0].write_bytes(cache[0].read_bytes()[:50])  # damaged: rebuilt, never trusted
    assert torch.equal(data.label_clusters(xmc, max_leaf=4, cache_dir=folder), assignment)
    assert "not a valid cache; rebuilding it" in capsys.readouterr().out
    assert torch.equal(torch.from_numpy(np.load(cache[0])), assignment) and not list(folder.glob(".*tmp*"))


# ---------------------------------------------------------------------------------------------
# Token caches.

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


BLANKS = [" ", "  ", "\t", " \n ", "\r\n", "\u00a0", "\x85", "\u2003", "\x1c"]  # \x1c: Python's blank, BERT deletes it
PIECES = ["red", "green", "blue", "apple", "unripe", "reds", "pie", "sky", "xyz", ",", "!", "Sky", "caf\u00e9",
          "[PAD]", "[SEP]"]
VANISHING = ["\u0301", "\x01", "\u200b"]  # a lone accent, a control and a zero-width character: no token


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(PIECES) | st.sampled_from(VANISHING), st.sampled_from(BLANKS)),
                         max_size=14), min_size=1, max_size=6), st.integers(3, 9))
def test_cut_texts_tokenise_exactly_as_whole_texts(tokenizer_dir, documents, max_length):
    """encode cuts a text after max_length words: the ids and lengths must be those of the whole
    text, truncated, for any mix of known and unknown words, punctuation, accents, control
    characters, special-token strings and Unicode blanks (words that give no token included)."""
    tokenizer = data.load_tokenizer(tokenizer_dir)
    texts = ["".join(piece + blank for piece, blank in document) for document in documents]
    rows = data.encode(texts, tokenizer, max_length, data.token_dtype(tokenizer, max_length))
    whole = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="np")
    assert np.array_equal(rows["ids"], whole["input_ids"])
    assert np.array_equal(rows["length"], whole["attention_mask"].sum(1))


def test_token_cache_is_built_once_reused_and_rebuilt_when_stale_or_damaged(tmp_path, tokenizer_dir, monkeypatch, capsys):
    folder = write_data_set(tmp_path / "Set", "raw", SPLITS)
    write(folder / "test_raw_texts.txt", "red apple\nsky [PAD] sea\n" + "pie\n" * 10)
    xmc = data.load(folder)
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 5)  # several batches
    rows = np.array(data.token_cache(xmc.test, str(tokenizer_dir), 6, folder))  # a copy: the test damages the file
    tokenizer = data.load_tokenizer(tokenizer_dir)
    expected = tokenizer(list(xmc.test.texts), max_length=6, truncation=True, padding="max_length", return_tensors="np")
    assert np.array_equal(rows["ids"], expected["input_ids"]) and rows["ids"].dtype == np.uint16
    assert rows["length"].tolist()[:2] == [4, 5]  # [CLS] red apple [SEP]; the [PAD] in the text counts
    batch = data.make_batch(xmc.test, np.array([1, 0]), rows)
    assert batch.tokens["input_ids"].shape == (2, 5)  # padded only as far as the longest document
    assert batch.tokens["attention_mask"].tolist() == [[1] * 5, [1] * 4 + [0]]

    caches = list(folder.glob("tokens_*.npy"))
    monkeypatch.setattr(data, "encode", None)  # a second run must not tokenise again
    assert np.array_equal(data.token_cache(xmc.test, str(tokenizer_dir), 6, folder), rows)
    monkeypatch.undo()
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 5)

    caches[0].write_bytes(caches[0].read_bytes()[:200])  # damaged
    assert np.array_equal(data.token_cache(xmc.test, str(tokenizer_dir), 6, folder), rows)
    assert "not a valid cache" in capsys.readouterr().out
    write(folder / "test_raw_texts.txt", "blue sky\n" * 12)  # a changed file: a new cache
    fresh = data.token_cache(data.load(folder).test, str(tokenizer_dir), 6, folder)
    assert fresh["ids"][0, :4].tolist() == tokenizer("blue sky")["input_ids"]
    assert len(list(folder.glob("tokens_*.npy"))) == 2 and not list(folder.glob(".*tmp*"))


def test_a_read_only_data_folder_puts_caches_in_the_fallback(tmp_path):
    xmc = data.load(write_data_set(tmp_path / "Set", "bow", SPLITS))
    assert data.cache_dir(xmc, tmp_path / "run") == tmp_path / "Set"
    (tmp_path / "Set").chmod(0o555)
    try:
        if not data.os.access(tmp_path / "Set", data.os.W_OK):  # root may write anyway
            assert data.cache_dir(xmc, tmp_path / "run") == tmp_path / "run"
    finally:
        (tmp_path / "Set").chmod(0o755)
    assert data.cache_dir(data.synthetic(num_train=50, num_test=10), tmp_path / "run") == tmp_path / "run"


# ---------------------------------------------------------------------------------------------
# Batches.

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


def empty_split(folder, layout, split):
    """Empties `split` of a tiny data set in `layout`, as a user's broken export would: a bag-of-words
    file with the header `0 F L`, or 0-byte text, label or JSON files."""
    if layout == "bow":
        write(folder / f"{split}.txt", "0 20 8\n")
    elif layout == "raw":
        write(folder / f"{split}_raw_texts.txt", ""), write(folder / f"{split}_labels.txt", "")
    else:
        write(folder / ("trn.json" if split == "train" else "tst.json"), "")
    return folder / {"bow": f"{split}.txt", "raw": f"{split}_labels.txt",
                     "lf": "trn.json" if split == "train" else "tst.json"}[layout]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("layout", ["bow", "raw", "lf"])
def test_an_empty_split_of_any_layout_is_refused_when_read_naming_its_file(tmp_path, layout, split):
    folder = write_data_set(tmp_path / "Set", layout, SPLITS)
    path = empty_split(folder, layout, split)
    role = "training" if split == "train" else "test"
    with pytest.raises(data.DataError, match=f"^{path}: no documents; the {role} split needs at least one$"):
        data.load(folder)


def test_a_file_beside_its_gzipped_copy_is_refused(tmp_path):
    folder = write_data_set(tmp_path / "Set", "bow", SPLITS)
    write_data_set(tmp_path / "Set", "bow", SPLITS, gz=True)
    with pytest.raises(data.DataError, match=f"{folder}: both train.txt and train.txt.gz exist"):
        data.load(folder)
    (folder / "train.txt").unlink()
    (folder / "test.txt.gz").unlink()
    assert len(data.load(folder).train) == 40  # one copy of each: read, gzipped or not


def test_lf_text_key_follows_the_data_set_folder_also_when_given_its_raw_text(tmp_path, capsys):
    """The "titles" rule reads the data set's name: LF-...Titles.../raw_text is still a titles set."""
    write_data_set(tmp_path / "LF-ShopTitles-1K", "lf-under-raw_text", SPLITS)
    for folder in (tmp_path / "LF-ShopTitles-1K", tmp_path / "LF-ShopTitles-1K" / "raw_text"):
        xmc = data.load(folder)
        assert xmc.name == "LF-ShopTitles-1K" and xmc.train.texts.parts[0][1] == "title"
        assert "the documents' text is the 'title' field of trn.json" in capsys.readouterr().out


def refuse_to_open(monkeypatch, refused, error=PermissionError):
    """open() of the path `refused` fails as it would for a file the user may not read (as root,
    chmod stops no read, so the failure is made here)."""
    real_open = open

    def guarded(file, *arguments, **keywords):
        if str(file) == str(refused):
            raise error(13, "Permission denied", str(file))
        return real_open(file, *arguments, **keywords)
    monkeypatch.setattr("builtins.open", guarded)


@pytest.mark.parametrize("gz", [False, True])
def test_a_folder_or_an_unreadable_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch, gz):
    with pytest.raises(data.DataError, match=f"^{tmp_path}: cannot be opened \\(Is a directory\\)$"):
        list(data.read_lines(tmp_path))
    folder = write_data_set(tmp_path / "Set", "raw", SPLITS, gz)
    labels = folder / ("train_labels.txt" + (".gz" if gz else ""))
    refuse_to_open(monkeypatch, labels)
    with pytest.raises(data.DataError, match=f"^{labels}: cannot be opened \\(Permission denied\\)$"):
        data.load(folder)
