"""Presets: the values `python train.py --data NAME` gives the fields of train.py's Config.

The six data sets of the paper carry the official release's recipe value by value
(xmc-aalto/NeurIPS24-dst, config/dataset/*.yaml; tests/test_train.py holds them to a copy of its
table). `synthetic` and `delicious` are this project's CPU data sets. A folder without a preset
trains with BOW_DEFAULTS, or with TRANSFORMER_DEFAULTS when --encoder names a transformer.
Command-line flags override any value.
"""

# What all six of the release's configs share: its rewiring semantics (global fraction, constant
# over time; a threshold decayed to 1e-4; no cap per row; optimizer state kept), its optimizers and
# weight decays, fp16 with a gradient scaler, evaluation and early stopping, the seed.
RELEASE = dict(
    seed=42, precision="fp16", max_length=128, intermediate=0, intermediate_activation="none", fan_in=128,
    loss="squared_hinge", encoder_optimizer="adamw", weight_decay_encoder=0.01, lr_meta=5e-4,
    classifier_optimizer="adamw", weight_decay_classifier=1e-4, grad_accum=1, rewire_end=0.66,
    rewire_scope="global", rewire_fraction_schedule="constant", rewire_threshold_floor=1e-4, rewire_row_cap=0.0,
    rewire_reset_state=False, eval_every=1, patience=25)
AMAZON, WIKIPEDIA = dict(propensity_a=0.6, propensity_b=2.6), dict(propensity_a=0.5, propensity_b=0.4)
BERT = dict(RELEASE, encoder="bert-base-uncased", format="raw")

PRESETS = {
    "wiki10-31k": dict(BERT, pooling="mean", dropout=0.6, batch_size=32, epochs=100, intermediate=4096,
                       lr_intermediate=1e-2, fan_in=64, rewire_threshold=0.01, rewire_interval=300, aux_weight=0.0,
                       lr_encoder=1e-5, lr_classifier=0.01, warmup_steps=1000, **WIKIPEDIA),
    "wiki500k": dict(BERT, pooling="mean", dropout=0.5, batch_size=128, epochs=50, rewire_threshold=0.05,
                     rewire_interval=600, aux_weight=0.4, aux_epochs=8, lr_encoder=5e-5, lr_classifier=0.05,
                     warmup_steps=1000, **WIKIPEDIA),
    "amazon670k": dict(BERT, pooling="cls", dropout=0.6, batch_size=64, epochs=110, rewire_threshold=0.01,
                       rewire_interval=800, aux_weight=0.4, aux_epochs=15, lr_encoder=1e-5, lr_classifier=0.01,
                       warmup_steps=1000, **AMAZON),
    "amazon3m": dict(BERT, pooling="cls", dropout=0.35, batch_size=128, grad_accum=2, epochs=51, rewire_fraction=0.25,
                     rewire_interval=1500, aux_weight=0.0, lr_encoder=5e-5, lr_classifier=0.05, warmup_steps=10000,
                     lr_schedule_length="batches", **AMAZON),
    "lf-amazontitles-131k": dict(RELEASE, encoder="sentence-transformers/msmarco-distilbert-base-v4", format="lf",
                                 augment_labels=True, pooling="mean", max_length=32, dropout=0.7, batch_size=512,
                                 epochs=100, rewire_fraction=0.15, rewire_interval=1000, aux_weight=0.4, aux_epochs=12,
                                 loss="bce", encoder_optimizer="adam", lr_encoder=1e-5, classifier_optimizer="sgd",
                                 lr_classifier=0.08, warmup_steps=5000, **AMAZON),
    "lf-wikiseealso-320k": dict(RELEASE, encoder="sentence-transformers/paraphrase-distilroberta-base-v2",
                                format="lf", augment_labels=True, pooling="mean", max_length=32, dropout=0.55,
                                batch_size=128, epochs=101, rewire_threshold=0.02, rewire_interval=800, aux_weight=0.0,
                                lr_encoder=2e-4, weight_decay_encoder=1e-3, lr_classifier=0.01, warmup_steps=5000,
                                **WIKIPEDIA),
}

# A folder of raw text or LF json with --encoder: the Amazon-670K recipe (LF: 32 tokens, mean pooling).
TRANSFORMER_DEFAULTS = {k: v for k, v in PRESETS["amazon670k"].items() if k not in ("encoder", "format", *AMAZON)}
# A folder with the bag-of-words encoder: the values measured on Delicious (README).
BOW_DEFAULTS = dict(epochs=40, dim=1024, dropout=0.5, intermediate=2048, fan_in=128, loss="bce", rewire_interval=200)

PRESETS["delicious"] = dict(BOW_DEFAULTS, format="bow")
PRESETS["synthetic"] = dict(epochs=6, dim=256, intermediate=1024, fan_in=32, lr_encoder=2e-3, lr_classifier=1e-2,
                            warmup_steps=100, rewire_interval=200, aux_weight=0.4, aux_epochs=3)
