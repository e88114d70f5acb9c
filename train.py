"""Train an XMC model with a dynamic sparse classifier (the paper's full recipe, Sections 3-5).

One training step, top to bottom (see `train_step`):
  1. encode the batch, score all labels with the (sparse) classifier, and the label clusters with
     the meta-classifier while the auxiliary loss is on;
  2. loss = (1 - s) * main + s * aux: squared hinge (or BCE) over all labels from the list of
     positives, plus BCE of the cluster scores; s decays from aux_weight to 0 by a cosine over the
     first aux_epochs, then the meta head is no longer computed at all;
  3. backward, optional clipping, AdamW step (two learning rates: encoder / the rest), LR schedule;
  4. every rewire_interval steps until rewire_end of training: a SET rewire of the classifier.
Before the first step, `data.prepare` reads the data set and builds what training reads besides: bags
of words, label clusters, token-id caches (kept next to the data for later runs; --dry-run stops
there and reports sizes and peak memory). Every eval_every epochs: P@k / nDCG@k / PSP@k on the test
split, a JSON line in <out>/log.jsonl and an atomically written checkpoint (<out>/checkpoint.pt)
from which --resume continues exactly.

Under torchrun, every process trains a replica (DistributedDataParallel) on its share of each
batch; gradients are averaged, every replica rewires identically (a shared seed), the test split is
scored in shares and gathered, and only rank 0 prints and writes.

    python train.py                                   # the embedded synthetic data set, CPU, minutes
    python train.py --data delicious --data-dir ../shared/data
    python train.py --data amazon670k --data-dir data # the paper's setting (GPU)
    python train.py --data path/to/EURLex-4K          # any folder in the XC repository's formats
    torchrun --nproc_per_node 4 train.py --data amazon670k --data-dir data   # 4 GPUs, same global batch
"""
import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import dst
import evaluate
import model
import sparse_layer


@dataclass
class Config:
    data: str = "synthetic"  # synthetic, a named data set (its folder under data_dir), or a folder
    data_dir: str = "data"
    format: str = "auto"  # the folder's layout: bow, raw or lf (data.py); auto: found from its files
    augment_labels: bool = False  # LF data sets: each label's title is one more training document
    propensity_a: float = 0.55  # PSP@k's propensity constants A, B (Jain et al. 2016) of the data set
    propensity_b: float = 1.5
    out: str = ""  # run directory; default runs/<the data set's name>
    resume: bool = False  # continue from the newest readable checkpoint in <out>
    dry_run: bool = False  # prepare everything up to the first step, report sizes and peak memory, exit
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    precision: str = "bf16"  # autocast on a GPU: bf16, fp16 or fp32 (the CPU always runs fp32)
    # model
    encoder: str = "bow"  # bow, or a transformers name such as bert-base-uncased
    dim: int = 256  # width of the bag-of-words encoder
    pooling: str = "cls"  # transformer pooling: cls or mean
    max_length: int = 128  # transformer tokens per document
    dropout: float = 0.1
    intermediate: int = 0  # width of the dense intermediate layer (0: none)
    sparse: bool = True  # fixed fan-in classifier (else dense nn.Linear)
    fan_in: int = 32
    backend: str = "auto"  # sparse layer backend: auto, torch, cuda, cuda-simple
    # optimisation
    loss: str = "squared_hinge"  # or bce
    epochs: int = 10
    batch_size: int = 64  # the global batch: under torchrun, each of N processes takes 1/N of it
    lr_encoder: float = 1e-3
    lr_classifier: float = 1e-2
    weight_decay: float = 0.01
    warmup_steps: int = 100
    clip_grad: float = 0.0  # max gradient norm (0: off)
    # auxiliary loss
    aux_weight: float = 0.0  # initial s; 0 switches the meta-classifier off
    aux_epochs: float = 3.0  # s reaches 0 here
    max_leaf: int = 100  # labels per cluster
    # SET rewiring
    rewire_interval: int = 100
    rewire_fraction: float = 0.2  # fraction mode; the cap in threshold mode
    rewire_threshold: float = 0.0  # > 0: threshold mode
    rewire_end: float = 0.66
    eval_every: int = 1
    eval_batch_size: int = 256

    def __post_init__(self):
        choices = {"loss": tuple(model.LOSSES), "precision": ("bf16", "fp16", "fp32"), "format": ("auto", *data.LAYOUTS),
                   "device": ("auto", "cpu", "cuda"), "pooling": ("cls", "mean"),
                   "backend": sparse_layer.BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "fan_in", "dim", "eval_every", "rewire_interval", "max_leaf"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


# A folder without a preset trains with these: with the bag-of-words encoder, the values measured
# on Delicious (README; the aux loss off, as it did not help there); with a transformer, the
# paper's common recipe.
BOW_DEFAULTS = dict(epochs=40, dim=1024, dropout=0.5, intermediate=2048, fan_in=128, loss="bce", rewire_interval=200)
TRANSFORMER_DEFAULTS = dict(max_length=128, batch_size=64, fan_in=128, epochs=50, lr_encoder=1e-5,
                            lr_classifier=1e-2, warmup_steps=1000, aux_weight=0.4, aux_epochs=15, rewire_interval=800,
                            rewire_fraction=0.2, rewire_end=0.66, intermediate=0, eval_every=5)
AMAZON, WIKIPEDIA = dict(propensity_a=0.6, propensity_b=2.6), dict(propensity_a=0.5, propensity_b=0.4)
PRESETS = {  # the paper's data sets; any value can be overridden
    "synthetic": dict(epochs=6, dim=256, intermediate=1024, fan_in=32, lr_encoder=2e-3, lr_classifier=1e-2,
                      warmup_steps=100, rewire_interval=200, aux_weight=0.4, aux_epochs=3),
    "delicious": dict(BOW_DEFAULTS, format="bow"),
    "amazon670k": dict(TRANSFORMER_DEFAULTS, encoder="bert-base-uncased", format="raw", **AMAZON),
    "lf-amazontitles-131k": dict(TRANSFORMER_DEFAULTS, encoder="sentence-transformers/msmarco-distilbert-base-v4",
                                 format="lf", augment_labels=True, pooling="mean", max_length=32, dropout=0.7,
                                 batch_size=512, epochs=100, loss="bce", warmup_steps=5000, rewire_interval=1000,
                                 rewire_fraction=0.15, aux_epochs=12, **AMAZON),
    "lf-wikiseealso-320k": dict(TRANSFORMER_DEFAULTS, encoder="sentence-transformers/paraphrase-distilroberta-base-v2",
                                format="lf", augment_labels=True, pooling="mean", max_length=32, dropout=0.55,
                                batch_size=128, epochs=101, lr_encoder=2e-4, warmup_steps=5000, aux_weight=0.0,
                                rewire_threshold=0.02, **WIKIPEDIA),
}
PRESETS["wiki500k"] = dict(PRESETS["amazon670k"], max_length=256, **WIKIPEDIA)
PRESETS["amazon3m"] = dict(PRESETS["amazon670k"], max_length=128, epochs=20)
PRESETS["wiki10-31k"] = dict(PRESETS["amazon670k"], max_length=256, batch_size=32, epochs=30, **WIKIPEDIA)


def folder_defaults(folder, given):
    """A folder without a preset: its layout, found from its files, and the defaults above."""
    transformer = given.get("encoder", Config.encoder) != "bow"
    layout, _ = data.detect(data.locate(folder), given.get("format", "auto"), prefer_text=transformer)
    if not transformer:
        return dict(BOW_DEFAULTS, format=layout)
    return dict(TRANSFORMER_DEFAULTS, format=layout, **(dict(max_length=32, pooling="mean") if layout == "lf" else {}))


def parse_config(argv=None):
    """Config defaults < the data set's preset (or a folder's defaults) < command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=field.type, default=None, help=f"default {field.default!r}")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    name = given.get("data", Config.data)
    config = Config(**{**(PRESETS[name] if name in PRESETS else folder_defaults(name, given)), **given})
    return dataclasses.replace(config, out=config.out or f"runs/{Path(config.data).name}")


# ---------------------------------------------------------------------------------------------
# The auxiliary loss's weight.

def aux_weight(config, epoch_progress):
    """s: cosine from aux_weight to 0 over the first aux_epochs, then 0 (the meta head is dropped)."""
    if epoch_progress >= config.aux_epochs:
        return 0.0
    return config.aux_weight * 0.5 * (1 + math.cos(math.pi * epoch_progress / config.aux_epochs))


# ---------------------------------------------------------------------------------------------
# Set-up.

@dataclass
class Training:
    """Everything a training step touches, and what a checkpoint must restore."""
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rewiring: dst.RewireSchedule
    clusters: torch.Tensor | None  # cluster id per label, for the auxiliary loss
    scaler: torch.amp.GradScaler  # loss scaling, active only for fp16 on a GPU
    saved: dict  # how evaluate.py rebuilds data and model from a checkpoint
    steps_per_epoch: int
    replica: torch.nn.Module  # what a step calls: the network, wrapped in DDP under torchrun
    rank: int = 0  # this process, of `world` (torchrun); rank 0 prints and writes
    world: int = 1
    step: int = 0
    regrown: torch.Tensor | None = None  # slots regrown by the last rewire (for its survival rate)
    survived: float | None = None


def build(config, source, xmc, clusters, device, rank=0, world=1):
    clusters = None if clusters is None else clusters.to(device)
    arguments = dict(encoder=config.encoder, num_features=xmc.num_features, num_labels=xmc.num_labels,
                     num_clusters=0 if clusters is None else int(clusters.max()) + 1, dim=config.dim,
                     dropout=config.dropout, pooling=config.pooling, intermediate=config.intermediate,
                     sparse=config.sparse, fan_in=config.fan_in, backend=config.backend)
    network = model.build(**arguments).to(device)
    replica = network
    if world > 1:
        # DDP copies rank 0's buffers (the indices) once, here, and not before every forward pass
        # (L * k * 4 bytes a step): every replica rewires the same weights with the same seed. The
        # meta head goes idle when the aux loss ends (DDP warns once, at step 1, that all were used).
        replica = torch.nn.parallel.DistributedDataParallel(network, forward_sync_buffers=False,
                                                            find_unused_parameters=network.meta is not None)
    encoder_params = list(network.encoder.parameters())
    others = [p for name, p in network.named_parameters() if not name.startswith("encoder.")]
    optimizer = torch.optim.AdamW([{"params": encoder_params, "lr": config.lr_encoder},
                                   {"params": others, "lr": config.lr_classifier}], weight_decay=config.weight_decay)
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {world} processes")
    steps_per_epoch = math.ceil(len(xmc.train) // world / (config.batch_size // world))
    total = steps_per_epoch * config.epochs

    def warmup_then_cosine(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - config.warmup_steps) / max(1, total - config.warmup_steps)))

    tokenizer = None if config.encoder == "bow" else dict(tokenizer_name=config.encoder, max_length=config.max_length)
    bow_inputs = config.encoder == "bow" and xmc.vocabulary is not None  # a bag-of-words model of raw text
    inputs = dict(label_names=xmc.label_names, vocabulary=xmc.vocabulary if bow_inputs else None,
                  idf=torch.from_numpy(xmc.idf) if bow_inputs else None)
    return Training(
        network=network, replica=replica, rank=rank, world=world, optimizer=optimizer, clusters=clusters,
        steps_per_epoch=steps_per_epoch,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine),
        rewiring=dst.RewireSchedule(total, config.rewire_interval, config.rewire_end, config.rewire_fraction,
                                    config.rewire_threshold or None),
        scaler=torch.amp.GradScaler(enabled=device.type == "cuda" and config.precision == "fp16"),
        saved=dict(model_arguments=arguments, tokenizer=tokenizer, inputs=inputs,
                   data_arguments=dict(source=source, format=config.format, augment_labels=config.augment_labels,
                                       propensity=(config.propensity_a, config.propensity_b))))


def seed_of(*parts):
    """A 63-bit seed from integers (seed, epoch, rank, ...), well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------------------------
# Checkpoints: <out>/checkpoint.pt, the newest, and <out>/checkpoint.previous.pt, the one before.

def checkpoint_files(out):
    """Newest first: the order in which --resume tries them."""
    return [Path(out) / "checkpoint.pt", Path(out) / "checkpoint.previous.pt"]


def save_checkpoint(path, state):
    """Write to a temporary file and flush it to disk; then the current checkpoint becomes the
    previous one, and the temporary file the current one (renames are atomic). A kill at any moment
    leaves at least one complete checkpoint and never half of one; between the two renames only
    the previous one exists, and --resume falls back to it."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, checkpoint_files(path.parent)[1])
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)  # make the renames themselves durable
    os.fsync(directory)
    os.close(directory)


def load_latest_checkpoint(out):
    """(path, state) of the newest checkpoint in `out` that loads."""
    for path in checkpoint_files(out):
        if path.exists():
            try:
                return path, evaluate.load_checkpoint(path)
            except ValueError as error:
                print(f"warning: {error}; skipped")
    raise FileNotFoundError(f"--resume: no readable checkpoint in {out}")


def checkpoint_state(t, epoch, config):
    return {"model": t.network.state_dict(), "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(), "epoch": epoch, "step": t.step, "regrown": t.regrown,
            "config": dataclasses.asdict(config), **t.saved}


def check_compatible(path, state, t, config):
    """Refuse a checkpoint of another model or data set in one line (other options may change)."""
    ignored = ("backend",)  # how the layer is computed, not what it is
    old = {**state["model_arguments"], "data": state["data_arguments"].get("source")}
    new = {**t.saved["model_arguments"], "data": t.saved["data_arguments"]["source"]}
    different = [f"{k} {old.get(k)!r} there, {v!r} here" for k, v in new.items() if k not in ignored and old.get(k) != v]
    if different:
        raise ValueError(f"{path} belongs to another model: {'; '.join(different)}. Resume with the options "
                         f"it was trained with, or start a new run with another --out")


def trim_log(path, last_epoch):
    """Keep the records of epochs up to `last_epoch`, rewritten atomically: a fallback to an older
    checkpoint leaves later ones, a kill during a write half a line."""
    def wanted(line):
        try:
            return json.loads(line)["epoch"] <= last_epoch
        except (ValueError, KeyError, TypeError):
            return False
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text("".join(line + "\n" for line in path.read_text().splitlines() if wanted(line)))
    os.replace(temporary, path)


def restore(t, state):
    """The inverse of checkpoint_state; returns the epoch to continue with."""
    t.network.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    t.step, t.regrown = state["step"], state["regrown"]
    if t.regrown is not None:  # saved from the GPU, loaded to the CPU (map_location): back beside the weights
        t.regrown = t.regrown.to(next(t.network.parameters()).device)
    return state["epoch"] + 1


# ---------------------------------------------------------------------------------------------
# Training.

def train_step(config, t, batch, device):
    """One step (module docstring, 1-4); returns (s, [total, main, aux] loss, connections rewired)."""
    s = aux_weight(config, t.step / t.steps_per_epoch)
    autocast = device.type == "cuda" and config.precision in ("bf16", "fp16")
    with torch.autocast(device.type, dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16,
                        enabled=autocast):
        scores, meta_scores = t.replica(batch, with_meta=s > 0)
    main = model.LOSSES[config.loss](scores, batch.positive_rows, batch.positive_labels)
    aux = model.meta_loss(meta_scores, batch.positive_rows, batch.positive_labels, t.clusters) if s > 0 else main.new_zeros(())
    loss = (1 - s) * main + s * aux
    losses = torch.stack([loss.detach(), main.detach(), aux.detach()])
    if t.world > 1:  # the global batch's losses (DDP averages the gradients the same way), on every rank
        torch.distributed.all_reduce(losses)
        losses /= t.world
    if not torch.isfinite(losses[0]):
        raise FloatingPointError(f"loss is {losses[0].item()} at step {t.step}; stopping before any checkpoint "
                                 f"is overwritten")

    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    if config.clip_grad > 0:
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(t.network.parameters(), config.clip_grad)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    t.step += 1

    rewired = 0
    if config.sparse and t.rewiring.due(t.step):
        # Seeded by the step alone: every replica draws the same new connections, and a resumed run
        # the same as an uninterrupted one.
        generator = torch.Generator(device).manual_seed(seed_of(config.seed, t.step))
        stats = dst.rewire(t.network.classifier, t.optimizer, previous_regrown=t.regrown, generator=generator,
                           **t.rewiring.arguments(t.step))
        t.regrown, t.survived, rewired = stats["regrown"], stats["survived"], stats["rewired"]
    return s, losses, rewired


def train_epoch(config, t, epoch, split, tokens, device):
    """One pass over the training split, in an order fixed by (seed, epoch); the epoch's averages."""
    t.network.train()
    torch.manual_seed(seed_of(config.seed, epoch, t.rank))  # dropout: fixed per epoch (exact resume), new per rank
    totals, rewired = torch.zeros(3, dtype=torch.float64), 0
    batches = data.batches(split, config.batch_size // t.world, shuffle=True, seed=config.seed, epoch=epoch,
                           tokens=tokens, rank=t.rank, world=t.world, even=True)
    progress = tqdm(batches, total=t.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", mininterval=1.0,
                    disable=None if t.rank == 0 else True, leave=False)
    for count, batch in enumerate(progress, start=1):
        s, losses, step_rewired = train_step(config, t, batch.to(device), device)
        totals, rewired = totals + losses.cpu(), rewired + step_rewired
        progress.set_postfix(loss=f"{totals[0] / count:.4g}", s=f"{s:.2f}", refresh=False)
    loss, main, aux = (totals / t.steps_per_epoch).tolist()
    return {"loss": loss, "main": main, "aux": aux, "rewired": rewired, "aux_weight": s}


def memory_report(network, device):
    sparse_bytes, dense_bytes = network.classifier_bytes()
    report = {"classifier_MB": sparse_bytes / 2**20, "dense_classifier_MB": dense_bytes / 2**20}
    if device.type == "cuda":
        report["peak_gpu_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return report


def start_processes(config):
    """(rank, world, device). Under torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE), join the
    process group: NCCL between GPUs (one per process), gloo between CPU processes."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # one voice: rank 0's (errors still reach stderr)
    return rank, world, device


def run(config, stop_after_epoch=None):
    """Train (or resume) and return the final metrics. stop_after_epoch ends early (tests)."""
    rank, world, device = start_processes(config)
    try:
        return train_and_evaluate(config, rank, world, device, stop_after_epoch)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def dry_run(xmc, t, tokens, seconds, device):
    """--dry-run: the sizes of what training would read and hold, how long preparing took (seconds)
    and the process's peak resident memory, printed as JSON (bench.py reads it)."""
    report = {"train_documents": len(xmc.train), "test_documents": len(xmc.test), "labels": xmc.num_labels,
              "features": xmc.num_features, "clusters": 0 if t.clusters is None else int(t.clusters.max()) + 1,
              "token_cache_MB": sum(rows.nbytes for rows in (tokens or {}).values()) / 2**20,
              "parameters": sum(p.numel() for p in t.network.parameters()), **memory_report(t.network, device),
              **seconds, "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    print("dry run: " + json.dumps(report, indent=1))
    return report


def train_and_evaluate(config, rank, world, device, stop_after_epoch):
    torch.manual_seed(config.seed)
    out = Path(config.out)
    existing = [path for path in checkpoint_files(out) if path.exists()]
    if config.resume and not existing:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    if not config.resume and not config.dry_run and (existing or (out / "log.jsonl").exists()):
        found = (existing or [out / "log.jsonl"])[0]
        raise FileExistsError(f"{found} exists: pass --resume to continue that run, or choose another --out")

    started = time.time()
    source = data.locate(config.data, config.data_dir)
    if rank > 0:  # under torchrun, rank 0 builds the caches first, then the others find them built
        torch.distributed.barrier()
    xmc, clusters, tokens, seconds = data.prepare(source, config.format, config.augment_labels,
                                                  (config.propensity_a, config.propensity_b), config.encoder,
                                                  config.max_length, config.max_leaf if config.aux_weight > 0 else None,
                                                  fallback=out)
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    features = f"{xmc.num_features:,} features, " if xmc.num_features else ""  # a transformer needs none
    print(f"{xmc.name}: {len(xmc.train):,} train / {len(xmc.test):,} test documents, {features}"
          f"{xmc.num_labels:,} labels ({time.time() - started:.1f}s)")
    t = build(config, source, xmc, clusters, device, rank, world)
    if config.dry_run:
        return dry_run(xmc, t, tokens, seconds, device)
    tokens = tokens or {"train": None, "test": None}
    first_epoch = 0
    if config.resume:
        path, state = load_latest_checkpoint(out)
        check_compatible(path, state, t, config)
        first_epoch = restore(t, state)
        print(f"resumed from {path} after epoch {first_epoch} (step {t.step})")
    memory = memory_report(t.network, device)
    print(f"classifier: {'sparse, fan-in ' + str(config.fan_in) if config.sparse else 'dense'}; parameters + AdamW "
          f"state {memory['classifier_MB']:.1f} MB (dense: {memory['dense_classifier_MB']:.1f} MB); device {device}"
          + (f", {world} processes" if world > 1 else ""))

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".checkpoint*.tmp*"):  # left by a run killed while writing
            stale.unlink()
        if config.resume and (out / "log.jsonl").exists():
            trim_log(out / "log.jsonl", first_epoch)
    results = {}
    for epoch in range(first_epoch, config.epochs):
        epoch_start = time.time()
        record = train_epoch(config, t, epoch, xmc.train, tokens["train"], device)
        if epoch + 1 == config.epochs or (epoch + 1) % config.eval_every == 0:
            test = data.batches(xmc.test, config.eval_batch_size, tokens=tokens["test"], rank=rank, world=world)
            results = evaluate.evaluate(t.network, xmc, test, device, world=world)
        record |= {"epoch": epoch + 1, "step": t.step, "survived": t.survived,
                   "lr": [g["lr"] for g in t.optimizer.param_groups], "seconds": time.time() - epoch_start,
                   **memory_report(t.network, device), **results}
        print(f"epoch {epoch + 1}: loss {record['loss']:.4g} (aux weight {record['aux_weight']:.2f}), rewired "
              f"{record['rewired']:,}" + (f", P@1 {results['P@1']:.2f} P@5 {results['P@5']:.2f}" if results else ""))
        if not all(bool(torch.isfinite(p).all()) for p in t.network.parameters()):
            raise FloatingPointError(f"non-finite weights after step {t.step}; the checkpoint of the epoch before "
                                     f"is kept")
        if rank == 0:
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            save_checkpoint(out / "checkpoint.pt", checkpoint_state(t, epoch, config))
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            return results
    print(f"\n{xmc.name}, {'sparse' if config.sparse else 'dense'} classifier, "
          f"{config.epochs} epochs in {time.time() - started:.0f}s:")
    print(evaluate.table(results))
    if device.type == "cuda":
        print(f"peak GPU memory {memory_report(t.network, device)['peak_gpu_MB']:.0f} MB")
    return results


def main():
    try:
        run(parse_config())
    except (ValueError, FileExistsError, FileNotFoundError, FloatingPointError) as error:  # DataError too
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
