"""xc_files.py: readers of every layout (gzipped or not, good and malformed files, empty splits,
unreadable paths), the release's label ids, filtered evaluation and label-text augmentation,
the tokenizer on cut texts."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
import evaluate
import caches
import xc_files
from conftest import SPLITS, FixedScores, refuse_to_open, write, write_data_set
from test_data import labels_of

BOW = "3 6 4\n0,2 0:1 3:0.5\n 1:2\n3 5:1 0:1\n"


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["bow", "raw", "attentionxml", "lf", "lf-under-raw_text"])
def test_every_layout_gives_the_same_documents_and_labels(tmp_path, layout, gz):
    folder = write_data_set(tmp_path / "Set", layout, SPLITS, gz)
    assert xc_files.detect(folder)[0] == layout.split("-")[0].replace("attentionxml", "raw")
    xmc = xc_files.load(folder)
    assert xmc.num_labels == 8 and labels_of(xmc.train) == [labels for labels, _ in SPLITS["train"]]
    assert labels_of(xmc.test) == [labels for labels, _ in SPLITS["test"]]
    if layout != "bow":
        assert list(xmc.test.texts) == [text for _, text in SPLITS["test"]]
        assert xmc.label_names == [f"L{l:02d}" for l in range(8)]
    data.attach_bags(xmc)  # a text data set gets its bags from the texts, a bow one has them
    assert len(xmc.train.bag_offsets) == 41 and xmc.train.bag_ids.dtype == np.int32


def test_a_folder_with_two_layouts_is_read_as_the_encoder_needs_unless_forced(tmp_path):
    folder = write_data_set(write_data_set(tmp_path / "Set", "bow", SPLITS), "raw", SPLITS)
    assert xc_files.detect(folder)[0] == "bow"  # the bag-of-words encoder: the repository's own features
    assert xc_files.detect(folder, prefer_text=True)[0] == "raw"  # a transformer needs texts
    assert xc_files.detect(folder, format="raw")[0] == "raw"


def test_missing_or_incomplete_data_sets_say_which_files_and_where_from(tmp_path):
    with pytest.raises(data.DataError) as error:
        xc_files.detect(xc_files.locate("amazon670k", tmp_path), format="raw")
    assert str(tmp_path / "Amazon-670K") in str(error.value) and "Extreme Classification Repository" in str(error.value)
    assert "train_raw_texts.txt or train_texts.txt + train_labels.txt" in str(error.value)
    (tmp_path / "Empty").mkdir()
    with pytest.raises(data.DataError, match="no data set in .*Empty: expected train.txt"):
        xc_files.detect(tmp_path / "Empty")
    folder = write_data_set(tmp_path / "Half", "raw", SPLITS)
    (folder / "test_labels.txt").unlink()
    with pytest.raises(data.DataError, match="Half: missing test_labels.txt"):
        xc_files.detect(folder)
    with pytest.raises(data.DataError, match="no data set in .*Half: expected"):
        xc_files.detect(folder, format="lf")
    with pytest.raises(data.DataError, match="unknown data set 'imagenet'"):
        xc_files.locate("imagenet")


def test_label_ids_are_the_sorted_union_and_a_test_only_label_keeps_its_row_and_counts(tmp_path, capsys):
    """The release's convention: 'zeta' occurs only in the test split; it is a label all the same
    (L = 3), a right prediction of it counts in P@k, and with no training document its 1/p is the
    largest, so PSP@k rewards it most."""
    folder = tmp_path / "Tiny"
    write(folder / "train_raw_texts.txt", "red apple pie\ngreen apple\nblue sky\n")
    write(folder / "train_labels.txt", "fruit food\nfruit\nfood\n")
    write(folder / "test_raw_texts.txt", "apple sky\n")
    write(folder / "test_labels.txt", "zeta fruit\n")
    xmc = xc_files.load(folder)
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
    plain, augmented = xc_files.load(folder), xc_files.load(folder, augment_labels=True)
    assert len(augmented.train) == len(plain.train) + 8 and len(augmented.test) == len(plain.test)
    assert labels_of(augmented.train)[40:] == [[l] for l in range(8)]
    assert list(augmented.train.texts)[40:] == [f"w{l} w{l}" for l in range(8)]
    assert np.array_equal(augmented.label_frequencies(), plain.label_frequencies() + 1)  # counted in propensities
    with pytest.raises(data.DataError, match="only LF data sets"):
        xc_files.load(write_data_set(tmp_path / "Raw", "raw", SPLITS), augment_labels=True)


def test_lf_text_key_follows_the_data_set_name(tmp_path):
    for name, expected in (("LF-ShopTitles-1K", "title"), ("LF-Wiki-1K", "content")):
        folder = tmp_path / name
        write(folder / "trn.json", json.dumps({"title": "the title", "content": "the content", "target_ind": [0]}) + "\n")
        write(folder / "tst.json", json.dumps({"title": "the title", "content": "the content", "target_ind": [0]}) + "\n")
        write(folder / "lbl.json", json.dumps({"title": "a label"}) + "\n")
        assert list(xc_files.load(folder).train.texts) == [f"the {expected}"]


def test_filtered_evaluation_takes_the_filter_pairs_out_of_each_ranking(tmp_path):
    pairs = [(0, 3), (0, 5), (4, 0), (11, 7)]
    folder = lf_files(tmp_path / "LF-Tiny", **{"filter_labels_test.txt": "".join(f"{d} {l}\n" for d, l in pairs)})
    xmc = xc_files.load(folder)
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
        xc_files.load(folder)


def test_a_gzip_file_cut_short_is_an_error_with_file_and_line(tmp_path):
    folder = write_data_set(tmp_path / "Set", "raw", SPLITS, gz=True)
    labels = folder / "train_labels.txt.gz"
    labels.write_bytes(labels.read_bytes()[:-30])
    with pytest.raises(data.DataError, match=r"train_labels.txt.gz:\d+: cannot be read .* damaged or cut short"):
        xc_files.load(folder)
    texts = folder / "test_raw_texts.txt.gz"
    texts.write_bytes(b"not gzip at all\n")
    labels.unlink()
    write_data_set(tmp_path / "Set", "raw", {"train": SPLITS["train"]}, gz=True)
    with pytest.raises(data.DataError, match="test_raw_texts.txt.gz:1: cannot be read"):
        list(xc_files.load(folder).test.texts)


def test_texts_and_labels_must_pair_line_by_line(tmp_path):
    folder = write_data_set(tmp_path / "Set", "raw", SPLITS)
    write(folder / "train_raw_texts.txt", "".join(text + "\n" for _, text in SPLITS["train"][:-1]))
    with pytest.raises(data.DataError, match="train_raw_texts.txt: 39 texts for 40 label lines"):
        data.attach_bags(xc_files.load(folder))


def test_bow_reader_reads_labels_features_and_unlabelled_documents(tmp_path):
    split, num_features, num_labels = xc_files.read_bow(write(tmp_path / "t.txt", BOW))
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
        xc_files.read_bow(path)


def test_bow_reader_takes_crlf_and_refuses_undecodable_bytes_and_empty_files(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(BOW.replace("\n", "\r\n").encode())
    assert labels_of(xc_files.read_bow(path)[0]) == [[0, 2], [], [3]]
    path.write_bytes(b"\xef\xbb\xbf" + BOW.encode())  # a byte-order mark, as some editors write
    assert labels_of(xc_files.read_bow(path)[0]) == [[0, 2], [], [3]]
    path.write_bytes(b"1 6 4\n0 1:0.\xff5\n")
    with pytest.raises(data.DataError, match=f"{path}:2: malformed line"):
        xc_files.read_bow(path)
    path.write_bytes(b"")
    with pytest.raises(data.DataError, match=f"{path}:1: expected a header"):
        xc_files.read_bow(path)


def test_lines_survive_a_missing_final_newline_and_stray_carriage_returns(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"one\rstill one\r\ntwo")
    assert list(xc_files.read_lines(path)) == [(1, "one\rstill one"), (2, "two")]
    path.write_text("")
    assert list(xc_files.read_lines(path)) == []


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
    tokenizer = caches.load_tokenizer(tokenizer_dir)
    texts = ["".join(piece + blank for piece, blank in document) for document in documents]
    rows = caches.encode(texts, tokenizer, max_length, caches.token_dtype(tokenizer, max_length))
    whole = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="np")
    assert np.array_equal(rows["ids"], whole["input_ids"])
    assert np.array_equal(rows["length"], whole["attention_mask"].sum(1))


# ---------------------------------------------------------------------------------------------
# Batches.


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
        xc_files.load(folder)


def test_a_file_beside_its_gzipped_copy_is_refused(tmp_path):
    folder = write_data_set(tmp_path / "Set", "bow", SPLITS)
    write_data_set(tmp_path / "Set", "bow", SPLITS, gz=True)
    with pytest.raises(data.DataError, match=f"{folder}: both train.txt and train.txt.gz exist"):
        xc_files.load(folder)
    (folder / "train.txt").unlink()
    (folder / "test.txt.gz").unlink()
    assert len(xc_files.load(folder).train) == 40  # one copy of each: read, gzipped or not


def test_lf_text_key_follows_the_data_set_folder_also_when_given_its_raw_text(tmp_path, capsys):
    """The "titles" rule reads the data set's name: LF-...Titles.../raw_text is still a titles set."""
    write_data_set(tmp_path / "LF-ShopTitles-1K", "lf-under-raw_text", SPLITS)
    for folder in (tmp_path / "LF-ShopTitles-1K", tmp_path / "LF-ShopTitles-1K" / "raw_text"):
        xmc = xc_files.load(folder)
        assert xmc.name == "LF-ShopTitles-1K" and xmc.train.texts.parts[0][1] == "title"
        assert "the documents' text is the 'title' field of trn.json" in capsys.readouterr().out


@pytest.mark.parametrize("gz", [False, True])
def test_a_folder_or_an_unreadable_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch, gz):
    with pytest.raises(data.DataError, match=f"^{tmp_path}: cannot be opened \\(Is a directory\\)$"):
        list(xc_files.read_lines(tmp_path))
    folder = write_data_set(tmp_path / "Set", "raw", SPLITS, gz)
    labels = folder / ("train_labels.txt" + (".gz" if gz else ""))
    refuse_to_open(monkeypatch, labels)
    with pytest.raises(data.DataError, match=f"^{labels}: cannot be opened \\(Permission denied\\)$"):
        xc_files.load(folder)


def test_idf_weights_a_bag_of_words_files_features_by_the_training_splits_idf(tmp_path):
    folder = write_data_set(tmp_path / "bow", "bow", SPLITS)
    plain, weighted = xc_files.load(folder), xc_files.load(folder, idf=True)
    train = [set(text.split()) for _, text in SPLITS["train"]]
    for split in ("train", "test"):
        a, b = getattr(plain, split), getattr(weighted, split)
        assert np.array_equal(a.bag_ids, b.bag_ids)
        for row, (_, text) in enumerate(SPLITS[split]):
            words = sorted(set(text.split()))  # the writer's f:1 features, in its order
            assert b.bag_ids[b.bag_offsets[row]:b.bag_offsets[row + 1]].tolist() == [int(w[1:]) for w in words]
            idf = np.array([math.log((1 + len(train)) / (1 + sum(w in doc for doc in train))) + 1 for w in words])
            expected = idf / np.linalg.norm(idf)  # values 1, times idf, L2-normalised
            got = b.bag_values[b.bag_offsets[row]:b.bag_offsets[row + 1]]
            assert np.allclose(got, expected, atol=1e-6), (split, row)
    assert plain.feature_weights.tolist() == [1.0] * plain.num_features  # every feature is in a training document
    assert plain.fingerprint != weighted.fingerprint


@pytest.mark.parametrize("idf", [False, True])
def test_a_feature_no_training_document_has_weighs_nothing(tmp_path, idf):
    """Feature 2 is only in the test document: its embedding would stay untrained, so it weighs 0
    and the document's other feature keeps its whole L2 norm, in the test split and in predict's
    new documents; feature 1, in both training documents, weighs its idf log(3/3) + 1 = 1, or 1."""
    folder = tmp_path / "bow"
    folder.mkdir()
    (folder / "train.txt").write_text("2 3 2\n0 0:1 1:1\n1 1:1\n")
    (folder / "test.txt").write_text("1 3 2\n0 1:1 2:1\n")
    xmc = xc_files.load(folder, idf=idf)
    assert np.allclose(xmc.feature_weights, [math.log(3 / 2) + 1 if idf else 1, 1, 0])
    assert np.allclose(xmc.test.bag_values, [1, 0])
    assert np.allclose(xc_files.documents(["0:1 2:1"], 3, 2, feature_weights=xmc.feature_weights).bag_values, [1, 0])
