"""train.py end to end on tiny data sets: training lowers the loss, the two optimizers and their
schedules, non-finite losses and weights, the best epoch, transformers on raw text, one-line errors
of the command line (resume: test_checkpoint.py)."""
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import data
import evaluate
import model
import optimizers
import train
import caches
from config import Config, parse_config
from conftest import SPLITS, TINY, build_model, refuse_to_open, tiny_bert, write_data_set
from test_config import PAPER


def test_aux_weight_decays_by_cosine_then_stops():
    config = Config(aux_weight=0.4, aux_epochs=15)
    assert train.aux_weight(config, 0) == pytest.approx(0.4)
    assert train.aux_weight(config, 7.5) == pytest.approx(0.2)
    assert train.aux_weight(config, 15) == 0.0 and train.aux_weight(config, 40) == 0.0


def test_the_progress_bar_counts_documents(tiny, monkeypatch):
    """Its rate is documents per second: it counts every training document of an epoch once."""
    bars = []

    class Spy(train.tqdm):
        def __init__(self, *args, **kwargs):  # (a bar without a terminal is disabled: keep what it was given)
            super().__init__(*args, **kwargs)
            self.counted, self.given = 0, kwargs
            bars.append(self)

        def update(self, n=1):
            self.counted += n
            return super().update(n)
    monkeypatch.setattr(train, "tqdm", Spy)
    train.run(dataclasses.replace(tiny, epochs=2))
    assert len(bars) == 2 and all(bar.given["unit"] == "doc" and bar.counted == bar.given["total"] == TINY["num_train"]
                              for bar in bars)


@pytest.mark.parametrize("sparse", [True, False])
def test_training_lowers_the_loss_and_gives_sane_metrics(tiny, sparse):
    config = dataclasses.replace(tiny, sparse=sparse, epochs=4)
    results = train.run(config)
    log = [json.loads(line) for line in open(f"{config.out}/log.jsonl")]
    assert len(log) == 4 and log[-1]["main"] < log[0]["main"]
    assert all(0 <= value <= 100 for value in results.values())
    assert results["P@1"] > 8  # chance: about 2.5 true labels of 120, P@1 ~ 2
    assert (log[0]["rewired"] > 0) == sparse
    assert log[0]["aux_weight"] > 0 and log[-1]["aux_weight"] == 0


def test_non_finite_loss_stops_before_writing_a_checkpoint(tiny, monkeypatch):
    monkeypatch.setitem(model.LOSSES, "squared_hinge", lambda scores, rows, labels, **_: scores.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="at batch 0"):
        train.run(tiny)
    assert not (Path(tiny.out) / "checkpoint.pt").exists()


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny, monkeypatch):
    calls = []

    def poisoned(scores, rows, labels, **options):  # finite for the first epoch (19 steps) and 5 steps more
        calls.append(1)
        return model.squared_hinge(scores, rows, labels, **options) * (float("nan") if len(calls) > 24 else 1.0)

    monkeypatch.setitem(model.LOSSES, "squared_hinge", poisoned)
    with pytest.raises(FloatingPointError, match="at batch 24"):
        train.run(tiny)
    state = torch.load(Path(tiny.out) / "checkpoint.pt", weights_only=True)
    assert state["batches_done"] == 19 and all(torch.isfinite(t).all() for t in state["network"].values())


def test_non_finite_weights_are_never_saved(tiny, monkeypatch):
    train_epoch = train.train_epoch

    def poisoned(config, t, epoch, *args):
        record = train_epoch(config, t, epoch, *args)
        if epoch == 1:
            t.network.classifier.bias.data[0] = float("inf")
        return record

    monkeypatch.setattr(train, "train_epoch", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite weights after batch 38"):
        train.run(tiny)
    assert torch.load(Path(tiny.out) / "checkpoint.pt", weights_only=True)["batches_done"] == 19


def test_the_learning_rate_warms_up_linearly_then_falls_by_a_half_cosine():
    """transformers' get_cosine_schedule_with_warmup, which the release uses: 0 at step 0."""
    factors = [train.warmup_then_cosine(step, warmup=10, total=110) for step in range(111)]
    assert factors[:11] == [step / 10 for step in range(11)]
    assert factors[60] == pytest.approx(0.5) and factors[110] == pytest.approx(0)
    assert factors[10:] == sorted(factors[10:], reverse=True)


def test_the_two_optimizers_carry_the_release_groups(tiny):
    """The encoder's optimizer: decay on weights, none on biases and LayerNorm weights, the meta head
    and the intermediate layer with lrs of their own; the classifier's: its own lr and decay."""
    config = dataclasses.replace(tiny, intermediate=16, lr_encoder=1e-3, weight_decay_encoder=0.05, lr_meta=5e-4,
                                 lr_intermediate=2e-2, classifier_optimizer="sgd", lr_classifier=0.08,
                                 weight_decay_classifier=1e-4)
    network = build_model("bow", 50, 20, num_clusters=4, dim=8, intermediate=16, fan_in=4)
    encoder, classifier = optimizers.make_optimizers(config, network)
    groups = [(g["lr"], g["weight_decay"], {id(p) for p in g["params"]}) for g in encoder.param_groups]
    ids = lambda module: {id(p) for p in module.parameters()}
    assert groups == [(1e-3, 0.05, {id(network.encoder.embedding.weight)}), (1e-3, 0.0, {id(network.encoder.bias)}),
                      (5e-4, 0.01, ids(network.meta)), (2e-2, 0.01, ids(network.intermediate))]  # AdamW's default
    assert isinstance(classifier, torch.optim.SGD) and classifier.param_groups[0]["momentum"] == 0.9
    assert (classifier.param_groups[0]["lr"], classifier.param_groups[0]["weight_decay"]) == (0.08, 1e-4)
    assert {id(p) for p in classifier.param_groups[0]["params"]} == ids(network.classifier)


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_adam_a_block_of_rows_at_a_time_is_torchs_for_loop_bit_for_bit(kind, monkeypatch):
    """--optimizer-loop for-loop (the paper presets): RowBlocks against torch's foreach=False Adam(W)
    with blocks of 3 rows, over six steps with weight decay: the same weights and the same state
    dict (a checkpoint of either loads into the other)."""
    monkeypatch.setattr(optimizers, "BLOCK_ELEMENTS", 20)
    generator = torch.Generator().manual_seed(0)
    shapes = [(37, 7), (11,), ()]  # blocks of 2 rows, of 20 elements, and a scalar
    runs = []
    for implementation in ({"adamw": optimizers.RowBlockAdamW, "adam": optimizers.RowBlockAdam}[kind],
                           {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[kind]):
        generator.manual_seed(0)
        parameters = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
        optimizer = implementation(parameters, lr=0.01, weight_decay=0.1, foreach=False)
        for _ in range(6):
            for parameter in parameters:
                parameter.grad = torch.randn(parameter.shape, generator=generator)
            optimizer.step()
        runs.append((parameters, optimizer.state_dict()))
    (blocked, blocked_state), (torchs, torchs_state) = runs
    assert all(torch.equal(a, b) for a, b in zip(blocked, torchs))
    assert blocked_state["param_groups"] == torchs_state["param_groups"]
    for key, state in torchs_state["state"].items():
        for name, value in state.items():
            ours = blocked_state["state"][key][name]
            assert torch.equal(ours, value) and ours.dtype == value.dtype, name


def test_a_transformers_layer_norm_weights_and_biases_get_no_weight_decay(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    network = build_model(str(tiny_bert(tmp_path / "bert")), 0, 20, fan_in=4)
    encoder, _ = optimizers.make_optimizers(Config(encoder="adam", encoder_optimizer="adam"), network)
    names = {id(p): n for n, p in network.named_parameters()}
    decayed, exempt = ([names[id(p)] for p in group["params"]] for group in encoder.param_groups)
    assert isinstance(encoder, torch.optim.Adam) and exempt and decayed
    assert all(n.endswith("bias") or "LayerNorm" in n for n in exempt)
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in decayed)


def test_the_best_epoch_is_kept_and_logged_and_unevaluated_epochs_log_no_metrics(tiny, monkeypatch):
    scores = iter([30.0, 50.0, 40.0, 45.0])  # P@1 of the four evaluations; P@3 the same

    def evaluated(*args, **kwargs):
        value = next(scores)
        return {f"{m}@{k}": value for m in ("P", "nDCG", "PSP") for k in (1, 3, 5)}

    monkeypatch.setattr(train.evaluate, "evaluate", evaluated)
    train.run(dataclasses.replace(tiny, epochs=5, eval_every=1, patience=2, aux_weight=0.0))
    log = [json.loads(line) for line in open(Path(tiny.out) / "log.jsonl")]
    assert [r.get("P@1") for r in log] == [30.0, 50.0, 40.0, 45.0]  # early stop: P@3 no better twice
    assert [r["best_epoch"] for r in log] == [1, 2, 2, 2] and log[-1]["best_P@1"] == 50.0
    best = torch.load(Path(tiny.out) / "checkpoint.best.pt", weights_only=True)
    assert best["epochs_done"] == 2 and best["best_evaluation"]["P@1"] == 50.0  # saved after epoch 2
    scores = iter([30.0, 50.0])
    monkeypatch.setattr(train.evaluate, "evaluate", evaluated)
    train.run(dataclasses.replace(tiny, epochs=4, eval_every=2, aux_weight=0.0, out=tiny.out + "-every2"))
    log = [json.loads(line) for line in open(tiny.out + "-every2/log.jsonl")]
    assert ["P@1" in r for r in log] == [False, True, False, True]
    # rewiring ends after int(0.66 * 4) = 2 epochs; later epochs do not repeat the last survival rate
    assert [r["rewired"] > 0 for r in log] == [True, True, False, False]
    assert log[1]["survived"] is not None and log[2]["survived"] is None


@pytest.mark.parametrize("grad_accum, min_steps, epochs", [(1, 40, 3), (2, 40, 4), (1, 10, 2)])
def test_min_steps_adds_epochs_until_the_run_takes_that_many_optimizer_steps(tiny, grad_accum, min_steps, epochs):
    """600 documents in batches of 32 are 19 batches an epoch: 19 optimizer steps, or 10 in windows
    of 2 (the last one short). The run takes the fewest epochs that reach min_steps, never fewer than
    --epochs; the schedulers' step count is what the optimizers did."""
    train.run(dataclasses.replace(tiny, epochs=2, min_steps=min_steps, grad_accum=grad_accum, aux_weight=0.0))
    log = [json.loads(line) for line in open(Path(tiny.out) / "log.jsonl")]
    steps = torch.load(Path(tiny.out) / "checkpoint.pt", weights_only=True)["schedulers"][0]["last_epoch"]
    assert len(log) == epochs and steps == epochs * (19 if grad_accum == 1 else 10)
    assert steps >= min_steps and (epochs == 2 or steps - steps // epochs < min_steps)


def test_compile_compiles_the_encoder_in_place(tiny, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, *a, **k: compiled.append(type(module).__name__))
    t = train.set_up(dataclasses.replace(tiny, compile=True), "synthetic", data.synthetic(), None, torch.device("cpu"))
    assert compiled == ["BagOfWordsEncoder"] and "encoder.embedding.weight" in t.network.state_dict()


def test_evaluate_reloads_a_checkpoint(tiny):
    import evaluate
    results = train.run(dataclasses.replace(tiny, epochs=1))
    network, xmc, batches, _ = evaluate.load_for_evaluation(f"{tiny.out}/checkpoint.pt", 64, "cpu")
    again = evaluate.evaluate(network, xmc, batches, "cpu")
    assert again == pytest.approx(results)


@pytest.fixture
def text_folder(tmp_path, monkeypatch):
    """A raw-text data set whose words a tiny local BERT knows (labels: the upper-cased first two)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice("red green blue apple pie sky sea fruit".split(), 4)) for _ in range(80)]
    rows = [({w.upper() for w in t.split()[:2]}, t) for t in texts]
    folder = tmp_path / "data" / "Tiny"
    for split, part in (("train", rows[:60]), ("test", rows[60:])):
        (folder / f"{split}_raw_texts.txt").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}_raw_texts.txt").write_text("".join(t + "\n" for _, t in part))
        (folder / f"{split}_labels.txt").write_text("".join(" ".join(sorted(names)) + "\n" for names, _ in part))
    return folder, tiny_bert(tmp_path / "tiny-bert")


def test_transformer_encoder_on_raw_text(text_folder, tmp_path, monkeypatch):
    """The pretrained-encoder path, offline: a tiny random BERT stands in for bert-base-uncased.
    Clusters and token ids are cached next to the data; evaluate.py reads the same token cache, and
    rebuilds the model from the run's own folder: the original model folder is not needed."""
    folder, encoder = text_folder
    run = Config(data=str(folder), format="raw", encoder=str(encoder), max_length=8, pooling="mean",
                 out=str(tmp_path / "run"), epochs=2, batch_size=16, fan_in=8, intermediate=32, aux_weight=0.4,
                 aux_epochs=1, max_leaf=3, warmup_steps=2, lr_encoder=1e-3)
    results = train.run(run)
    assert 0 <= results["P@1"] <= 100
    assert len(list(folder.glob("clusters_3_*.npy"))) == 1 and len(list(folder.glob("tokens_*.npy"))) == 2
    shutil.rmtree(encoder)
    monkeypatch.setattr(caches, "encode", None)  # evaluation must not tokenise again
    network, xmc, batches, _ = evaluate.load_for_evaluation(tmp_path / "run" / "checkpoint.pt", 7, "cpu")
    assert evaluate.evaluate(network, xmc, batches, "cpu") == pytest.approx(results)
    monkeypatch.undo()
    state = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert evaluate.predict(state, tmp_path / "run", ["red apple", "blue sea"], 2, 8, "cpu", "new")[0].split()[0] \
        .split(":")[0] in xmc.label_names


def test_a_frozen_encoder_is_computed_once_and_read_from_its_cache(text_folder, tmp_path, monkeypatch):
    """--freeze-encoder: every document's pooled output is computed once (batches of similar
    lengths) into a cache beside the token ids, each row the encoder's own output for that document
    alone; training leaves the encoder's weights as they were and reads the cache, which a second
    run finds; evaluate.py, which runs the encoder itself, gives the run's metrics. With
    --classifier-init centroids, no intermediate layer and no aux loss, nothing but the classifier trains."""
    folder, encoder = text_folder
    run = Config(data=str(folder), format="raw", encoder=str(encoder), max_length=8, pooling="mean",
                 out=str(tmp_path / "run"), epochs=2, batch_size=16, fan_in=8, intermediate=0, aux_weight=0.0,
                 warmup_steps=2, freeze_encoder=True, classifier_init="centroids", dropout=0.0)
    results = train.run(run)
    original = model.TransformerEncoder(str(encoder), "mean").eval()
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["network"]
    for name, weights in original.state_dict().items():
        assert torch.equal(saved[f"encoder.{name}"], weights), name
    tokens = {len(a): a for a in map(np.load, folder.glob("tokens_*.npy"))}
    cached = {len(a): a for a in map(np.load, folder.glob("pooled_*.npy"))}
    assert sorted(cached) == sorted(tokens) == [20, 60]
    for count, rows in tokens.items():
        with torch.no_grad():
            alone = torch.cat([original.pool(data.token_batch(rows, [i])) for i in range(count)])
        torch.testing.assert_close(torch.from_numpy(cached[count]), alone, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(caches, "pooled_cache", None)  # evaluate.py runs the encoder itself...
    network, xmc, batches, _ = evaluate.load_for_evaluation(tmp_path / "run" / "checkpoint.pt", 7, "cpu")
    assert evaluate.evaluate(network, xmc, batches, "cpu") == pytest.approx(results, abs=1e-6)
    monkeypatch.undo()
    monkeypatch.setattr(model.TransformerEncoder, "pool", None)  # ...and a second run only reads the cache
    assert train.run(dataclasses.replace(run, out=str(tmp_path / "again"))) == results


def test_dry_run_prepares_everything_reports_and_trains_nothing(text_folder, tmp_path, monkeypatch, capsys):
    folder, encoder = text_folder
    run = Config(data=str(folder), format="raw", encoder=str(encoder), max_length=8, out=str(tmp_path / "run"),
                 fan_in=8, intermediate=0, aux_weight=0.4, max_leaf=3, dry_run=True)
    report = train.run(run)
    assert (report["train_documents"], report["test_documents"], report["labels"]) == (60, 20, 8)
    assert report["clusters"] >= 3 and report["token_cache_MB"] == (60 + 20) * (4 + 8 * 2) / 2**20
    assert report["peak_rss_MB"] > 0 and set(report) >= {"load_s", "clusters_s", "tokens_s", "classifier_MB"}
    assert not (tmp_path / "run").exists()  # nothing written but the caches next to the data
    printed = capsys.readouterr().out
    assert json.loads(printed.split("dry run: ")[-1]) == report
    fields = dict(line.split(" = ", 1) for line in printed.splitlines() if " = " in line)  # the resolved config
    assert fields == {f.name: repr(getattr(run, f.name)) for f in dataclasses.fields(run)}
    monkeypatch.setattr(caches, "encode", None)  # a second start, with another --out, finds both caches
    monkeypatch.setattr(data, "cluster_labels", None)
    assert train.run(dataclasses.replace(run, out=str(tmp_path / "other")))["clusters"] == report["clusters"]


def run_main(monkeypatch, argv):
    """train.py as a user runs it: the one line it exits with (SystemExit's message)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as stop:
        train.main()
    return str(stop.value.code)


def test_an_empty_split_or_an_unreadable_file_stops_train_py_in_one_line_before_any_model(tmp_path, monkeypatch):
    monkeypatch.setattr(model, "build", lambda *a, **k: pytest.fail("a model was built"))
    folder = write_data_set(tmp_path / "Set", "lf", SPLITS)
    (folder / "trn.json").write_text("")
    out = ["--out", str(tmp_path / "run")]
    assert run_main(monkeypatch, ["--data", str(folder), *out]) == \
        f"error: {folder / 'trn.json'}: no documents; the training split needs at least one"
    bow = write_data_set(tmp_path / "Bow", "bow", SPLITS)
    (bow / "test.txt").write_text("0 20 8\n")
    assert run_main(monkeypatch, ["--data", str(bow), *out]) == \
        f"error: {bow / 'test.txt'}: no documents; the test split needs at least one"
    (bow / "test.txt").write_text((folder / "tst.json").read_text())  # any content: it is never opened
    assert run_main(monkeypatch, ["--data", str(bow / "train.txt"), *out]).startswith(
        f"error: no data set at {bow / 'train.txt'}: expected a folder with")  # a file where a folder belongs
    refuse_to_open(monkeypatch, bow / "test.txt")
    assert run_main(monkeypatch, ["--data", str(bow), *out]) == \
        f"error: {bow / 'test.txt'}: cannot be opened (Permission denied)"


def test_the_amazon3m_schedule_is_the_releases_sized_in_batches_stepped_per_optimizer_step():
    """The release sizes the cosine in batches (len(train_loader) * epochs) and steps it once per
    optimizer step (every grad_accum batches). Independently, for Amazon-3M's 1,717,899 training
    documents, batch 128, grad_accum 2, 51 epochs, warm-up 10,000: 13,422 batches an epoch, 684,522
    in the schedule, 342,261 optimizer steps; the factor after the last step is 0.512, its mean over
    the run's steps 0.813. The other choice spans the optimizer steps: it ends at 0, mean about 0.5."""
    config = parse_config(["--data", "amazon3m"])
    batches = -(-1_717_899 // 128)
    steps, length = -(-batches // 2) * 51, batches * 51
    assert (batches, steps, length) == (13_422, 342_261, 684_522)
    assert train.schedule_length(config, batches) == length
    expected = lambda step: np.where(step < 10_000, step / 10_000,
                                     0.5 * (1 + np.cos(np.pi * (step - 10_000) / (length - 10_000))))
    factors = np.array([train.warmup_then_cosine(step, 10_000, train.schedule_length(config, batches))
                        for step in range(steps + 1)])
    assert np.allclose(factors, expected(np.arange(steps + 1)), atol=1e-12)
    assert factors.max() == 1.0 == factors[10_000]
    assert factors[-1] == pytest.approx(0.512, abs=5e-4) and factors[:-1].mean() == pytest.approx(0.813, abs=1e-3)
    ours = dataclasses.replace(config, lr_schedule_length="steps")
    assert train.schedule_length(ours, batches) == steps
    ours_factors = [train.warmup_then_cosine(step, 10_000, steps) for step in range(steps)]
    assert ours_factors[-1] < 1e-9 and np.mean(ours_factors) == pytest.approx(0.5, abs=0.01)
    for name in set(PAPER) - {"amazon3m"}:  # grad_accum 1: both lengths are the same
        assert parse_config(["--data", name]).lr_schedule_length == "steps"


def test_no_decay_names_reproduces_the_releases_name_match_which_misses_distilberts_norms(tmp_path, monkeypatch):
    import transformers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "distilbert"
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "word"]
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocabulary)}).save_pretrained(folder)
    transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=len(vocabulary), dim=16, n_layers=2,
                                                               n_heads=2, hidden_dim=32)).save_pretrained(folder)
    network = build_model(str(folder), 0, 20, fan_in=4)
    names = {id(p): n for n, p in network.named_parameters()}
    layer_norms = [n for n in names.values() if "layer_norm.weight" in n]
    assert len(layer_norms) == 4  # sa_layer_norm and output_layer_norm in each of 2 layers
    for no_decay, decayed_norms in (("modules", []), ("names", layer_norms)):
        encoder, _ = optimizers.make_optimizers(Config(no_decay=no_decay), network)
        decayed, exempt = ([names[id(p)] for p in group["params"]] for group in encoder.param_groups)
        assert sorted(n for n in decayed if "norm" in n.lower()) == sorted(decayed_norms), no_decay
        assert "encoder.transformer.embeddings.LayerNorm.weight" in exempt
        assert all(n.endswith("bias") for n in exempt if "norm" not in n.lower())


def test_with_a_validation_split_no_choice_reads_the_test_split(tmp_path):
    """Permuting the test labels among the test documents changes every test number and no saved
    checkpoint: the best epoch, early stopping and the weights all come from the validation split."""
    from conftest import corpus
    rows = {"train": corpus(300, 0), "test": corpus(80, 1)}
    permuted = [(labels, text) for (_, text), (labels, _) in
                zip(rows["test"], [rows["test"][i] for i in np.random.default_rng(0).permutation(80)])]
    saved = {}
    for name, test in (("original", rows["test"]), ("permuted", permuted)):
        folder = write_data_set(tmp_path / name, "bow", {"train": rows["train"], "test": test})
        config = Config(data=str(folder), out=str(tmp_path / f"run-{name}"), epochs=12, dim=16, intermediate=0,
                        fan_in=4, batch_size=32, warmup_steps=5, lr_encoder=3e-2, lr_classifier=3e-2,
                        rewire_interval=5, aux_weight=0.4, aux_epochs=3, max_leaf=4, validation_fraction=0.2,
                        patience=2)
        train.run(config)
        saved[name] = {kind: torch.load(Path(config.out) / f"checkpoint{kind}.pt", weights_only=True)
                       for kind in ("", ".best", ".previous")}
    def same(a, b):  # nested dicts and lists of tensors and numbers, exactly
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(map(same, a, b))
        return torch.equal(a, b) if torch.is_tensor(a) else a == b

    for kind, original in saved["original"].items():
        permuted = saved["permuted"][kind]
        assert original["epochs_done"] == permuted["epochs_done"]
        assert original["best_evaluation"]["epoch"] == permuted["best_evaluation"]["epoch"]
        assert original["best_evaluation"]["validation"] == permuted["best_evaluation"]["validation"]
        for part in ("network", "optimizers", "schedulers", "last_regrown", "best_p3", "evaluations_since_best_p3"):
            assert same(original[part], permuted[part]), (kind, part)
        assert original["best_evaluation"]["P@1"] != permuted["best_evaluation"]["P@1"]  # the test split did change
    assert saved["original"][""]["epochs_done"] < 12  # early stopping did act (on validation P@3)
