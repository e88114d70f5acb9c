"""Train an XMC model with a dynamic sparse classifier (the paper's full recipe, Sections 3-5).

One training step, top to bottom (`train_step`, called by `train_epoch` for every batch):
  1. encode the batch, score all labels with the (sparse) classifier, and the label clusters with
     the meta-classifier while the auxiliary loss is on;
  2. loss = (1 - s) * main + s * aux: squared hinge (or BCE) over all labels from the list of
     positives, plus BCE of the cluster scores; s decays from aux_weight to 0 by a cosine over the
     first aux_epochs, then the meta head is no longer computed at all;
  3. backward; gradients add up over grad_accum batches, then `optimizer_step`: optional clipping,
     a step of both optimizers (the encoder's, with the meta head and the intermediate layer; the
     classifier's), their learning rates (`warmup_then_cosine`);
  4. every rewire_interval batches during the first rewire_end of the epochs: `dst.rewire`, a SET
     step of the classifier by the amount the RewireSchedule gives.
`train_and_evaluate` is the loop around it: set up (`load_data`, `set_up`), then per epoch train,
evaluate when due, log, checkpoint (checkpoint.py), stop when --patience runs out. `python
train.py` runs config.Config()'s defaults; `--data NAME` starts from a preset (config.py).

Under torchrun, every process trains a replica (DistributedDataParallel) on its share of each
batch; gradients are averaged (a summed loss is scaled by the number of processes to make up for
it), every replica rewires identically (a shared seed), the test split is scored in shares and
gathered, and only rank 0 prints and writes.

    python train.py                                   # the embedded synthetic data set, CPU, half a minute
    python train.py --data ../shared/data/delicious   # any folder in the XC repository's formats
    torchrun --nproc_per_node 4 train.py --data amazon670k --data-dir data   # the paper's setting, 4 GPUs
"""
import contextlib
import dataclasses
import functools
import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import caches
import checkpoint
import data
import dst
import evaluate
import model
import processes
import xc_files
from config import autocast_dtype, batches_in_an_epoch, lengthened, parse_config, recipe
from optimizers import make_optimizers


# ---------------------------------------------------------------------------------------------
# Schedules: the auxiliary loss's weight, and the learning rates.

def aux_weight(config, epoch_progress):
    """s: cosine from aux_weight to 0 over the first aux_epochs, then 0 (the meta head is dropped)."""
    if epoch_progress >= config.aux_epochs:
        return 0.0
    return config.aux_weight * 0.5 * (1 + math.cos(math.pi * epoch_progress / config.aux_epochs))


def schedule_length(config, batches_per_epoch):
    """The optimizer steps the learning rate's cosine spans: those the run takes, or (lr_schedule_length
    "batches", the release's way) its batches. With grad_accum > 1 the release steps its schedule once
    per optimizer step but sizes it in batches, so its run ends part-way down the cosine (Amazon-3M:
    at 0.512 of the peak)."""
    if config.lr_schedule_length == "batches":
        return batches_per_epoch * config.epochs
    return math.ceil(batches_per_epoch / config.grad_accum) * config.epochs


def warmup_then_cosine(step, warmup, total):
    """The learning-rate factor at optimizer step `step`: a linear warm-up from 0 over `warmup`
    steps, then a half cosine down to 0 at `total` (transformers' get_cosine_schedule_with_warmup,
    which the release uses for both optimizers)."""
    if step < warmup:
        return step / warmup
    return max(0.0, 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------------------------
# Set-up.

@dataclass
class TrainingState:
    """Everything a training step touches, and what a checkpoint must restore."""
    network: torch.nn.Module
    replica: torch.nn.Module  # what a step calls: the network, wrapped in DDP under torchrun
    optimizers: list  # [the encoder's (with the meta head and the intermediate layer), the classifier's]
    schedulers: list  # their learning rates, stepped with them
    rewire_schedule: dst.RewireSchedule
    clusters: torch.Tensor | None  # cluster id per label, for the auxiliary loss
    autocast: torch.dtype | None  # the forward passes' autocast (config.autocast_dtype); None: fp32
    scaler: torch.amp.GradScaler  # loss scaling, active only under fp16 autocast
    rebuild: dict  # what evaluate.py rebuilds data and model from (checkpoint.py lists the keys)
    batches_per_epoch: int
    rank: int = 0  # this process, of `world` (torchrun); rank 0 prints and writes
    world: int = 1
    batches_done: int = 0  # training batches
    last_regrown: torch.Tensor | None = None  # slots regrown by the last rewire, as bits (dst.packed)
    last_survival: float | None = None  # of the regrown slots, the share the next rewire kept
    best_evaluation: dict = field(default_factory=dict)  # the evaluation of best P@1 (keep_best), with its epoch
    best_p3: float = -1.0  # early stopping: the best P@3 (keep_best), and the evaluations since it
    evaluations_since_best_p3: int = 0
    skipped_steps: int = 0  # optimizer steps the fp16 gradient scaler skipped (non-finite gradients)
    non_finite_in_a_row: int = 0  # batches of non-finite loss since the last finite one


def set_up(config, source, xmc, clusters, device, rank=0, world=1):
    """The TrainingState of a new run: the model (in DDP under torchrun), its optimizers and their
    learning-rate schedules, the rewiring schedule, the loss scaler, what checkpoints record."""
    grouping_clusters = clusters  # (loaded for the label groups alone when the aux loss is off: no meta head)
    clusters = None if clusters is None or config.aux_weight == 0 and config.groups_by_clusters else clusters.to(device)
    head = model.head_size(config.dense_head, xmc.num_labels, config.group_size) if config.dense_head else 0
    arguments = dict(encoder=config.encoder, num_features=xmc.num_features, num_labels=xmc.num_labels,
                     num_clusters=0 if clusters is None else int(clusters.max()) + 1, dim=config.dim,
                     dropout=config.dropout, pooling=config.pooling, intermediate=config.intermediate,
                     intermediate_activation=config.intermediate_activation, sparse=config.sparse,
                     fan_in=config.fan_in, backend=config.backend, group_size=config.group_size, head=head)
    network = model.build(**arguments)
    if network.label_position is not None:  # HASTE's order of the labels in the classifier (model.label_order)
        counts = torch.from_numpy(xmc.label_frequencies())
        network.set_label_order(model.label_order(config.grouping, counts, grouping_clusters, head, config.seed))
    network = network.to(device)
    if config.checkpoint_activations:  # the same gradients (dropout's random state is kept), one more forward pass
        transformer = network.encoder.transformer  # transformers 5 renamed the call; 4 has the older name only
        getattr(transformer, "activation_checkpointing_enable", transformer.gradient_checkpointing_enable)(
            {"use_reentrant": False})
    if config.sparse:
        network.sparse_classifier.keep_slots_by_input = config.keep_slots_by_input
        # grad_accum > 1: the batches' weight gradients summed in place, the same bits in [L, k] less
        # memory (DDP must see autograd deliver each gradient, to average it)
        network.sparse_classifier.grad_in_place = world == 1
        network.loss_in_runs = config.loss_in_runs
    if config.freeze_encoder:
        network.encoder.requires_grad_(False)
    if config.compile:
        network.encoder.compile()  # in place: the state dict keeps its names
    replica = network
    if world > 1:
        # DDP copies rank 0's buffers (the indices) once, here, and not before every forward pass
        # (L * k * 4 bytes a step): every replica rewires the same weights with the same seed. The
        # meta head goes idle when the aux loss ends (DDP warns once, at step 1, that all were used).
        replica = torch.nn.parallel.DistributedDataParallel(network, forward_sync_buffers=False,
                                                            find_unused_parameters=network.meta is not None)
    batches_per_epoch = batches_in_an_epoch(config, len(xmc.fit_rows()), world)
    optimizers = make_optimizers(config, network)
    schedule = functools.partial(warmup_then_cosine, warmup=config.warmup_steps,
                                 total=schedule_length(config, batches_per_epoch))
    bow = config.encoder == "bow"  # new documents need raw text's vocabulary, and the features' weights
    inputs = dict(label_names=xmc.label_names, vocabulary=xmc.vocabulary if bow else None,
                  feature_weights=torch.from_numpy(xmc.feature_weights) if bow and xmc.feature_weights is not None
                  else None)
    rewire_schedule = dst.RewireSchedule(
        last_batch=int(config.rewire_end * config.epochs) * batches_per_epoch, interval=config.rewire_interval,
        fraction=config.rewire_fraction, threshold=config.rewire_threshold,
        fraction_schedule=config.rewire_fraction_schedule, threshold_floor=config.rewire_threshold_floor)
    rebuild = dict(model_arguments=arguments, inputs=inputs,
                   label_counts=torch.from_numpy(xmc.label_frequencies().astype(np.int32)),  # plot.py: head vs tail
                   max_length=None if config.encoder == "bow" else config.max_length,
                   data_arguments=dict(source=source, format=config.format, augment_labels=config.augment_labels,
                                       propensity=(config.propensity_a, config.propensity_b), idf=config.idf))
    autocast = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, init_scale=2**12, enabled=autocast == torch.float16)
    return TrainingState(
        network=network, replica=replica, rank=rank, world=world, optimizers=optimizers, clusters=clusters,
        batches_per_epoch=batches_per_epoch, rewire_schedule=rewire_schedule, rebuild=rebuild,
        schedulers=[torch.optim.lr_scheduler.LambdaLR(optimizer, schedule) for optimizer in optimizers],
        autocast=autocast, scaler=scaler)


def seed_of(*parts):
    """A 63-bit seed from integers (seed, epoch, rank, ...), well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------------------------
# Training.

# Batches of non-finite loss in a row after which an fp16 run stops: the gradient scaler skips such
# steps (and lowers its scale), but a loss that stays non-finite is a diverged model, not an overflow.
NON_FINITE_LIMIT = 10


def train_step(config, state, batch, device, window, last):
    """One batch (module docstring, 1-4); `last`: it closes a window of `window` batches, whose
    gradients add up to one optimizer step. Returns (s, [total, main, aux] loss, connections rewired)."""
    s = aux_weight(config, state.batches_done / state.batches_per_epoch)
    with torch.autocast(device.type, dtype=state.autocast, enabled=state.autocast is not None):
        # the main loss comes back instead of the [B, L] scores (model.py): never more than one of them
        main_loss, meta_scores = state.replica(batch, with_meta=s > 0,
                                               loss=(config.loss, batch.positive_rows, batch.positive_labels))
    if config.loss in model.SUMMED and state.world > 1:
        main_loss = main_loss * state.world  # DDP averages the ranks' gradients; a sum over the batch sums its shares
    aux_loss = (model.meta_loss(meta_scores, batch.positive_rows, batch.positive_labels, state.clusters) if s > 0
                else main_loss.new_zeros(()))
    loss = (1 - s) * main_loss + s * aux_loss
    del meta_scores  # the losses keep what backward needs
    losses = torch.stack([loss.detach(), main_loss.detach(), aux_loss.detach()])
    if state.world > 1:  # the global batch's losses (DDP averages the gradients the same way), on every rank
        torch.distributed.all_reduce(losses)
        losses /= state.world
    # A non-finite loss stops a run without a gradient scaler. With one (fp16) it goes on into the
    # backward pass, where the scaler finds non-finite gradients and skips the step (optimizer_step),
    # unless the loss stays non-finite for NON_FINITE_LIMIT batches. No checkpoint is overwritten.
    state.non_finite_in_a_row = 0 if torch.isfinite(losses[0]) else state.non_finite_in_a_row + 1
    if state.non_finite_in_a_row and (not state.scaler.is_enabled() or state.non_finite_in_a_row >= NON_FINITE_LIMIT):
        in_a_row = f" (non-finite {state.non_finite_in_a_row} batches in a row)" if state.scaler.is_enabled() else ""
        raise FloatingPointError(f"loss is {losses[0].item()} at batch {state.batches_done}{in_a_row}; stopping "
                                 f"before any checkpoint is overwritten")
    # DDP averages the gradients across processes once a window, at its last backward pass
    with contextlib.nullcontext() if last or state.world == 1 else state.replica.no_sync():
        state.scaler.scale(loss / window).backward()
    state.batches_done += 1
    rewired = 0
    if last:
        optimizer_step(config, state)
        if config.sparse and state.rewire_schedule.due(state.batches_done, window):
            # a SET rewire of the classifier (dst.py), seeded by the batch alone: every replica draws
            # the same new connections, and a resumed run the same as an uninterrupted one
            fraction, threshold = state.rewire_schedule.amount(state.batches_done)
            generator = torch.Generator(device).manual_seed(seed_of(config.seed, state.batches_done))
            layer = state.network.sparse_classifier
            stats = dst.rewire(layer, state.optimizers[1], fraction, threshold, scope=config.rewire_scope,
                               row_cap=config.rewire_row_cap, reset_state=config.rewire_reset_state, generator=generator,
                               previous_regrown=dst.unpacked(state.last_regrown, layer.indices.shape))
            state.last_survival, rewired = stats["survived"], stats["rewired"]
            state.last_regrown = dst.packed(stats["regrown"])  # a bit a slot until the next rewire
    return s, losses, rewired


def optimizer_step(config, state):
    if config.clip_grad > 0:
        for optimizer in state.optimizers:
            state.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(state.network.parameters(), config.clip_grad)
    for optimizer, scheduler in zip(state.optimizers, state.schedulers):
        if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            state.scaler.step(optimizer)  # skipped, when the scaler finds non-finite gradients
        else:  # nothing to update (a frozen encoder's optimizer), and a scaler would find no gradient to check
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    if state.scaler.is_enabled():
        scale = state.scaler.get_scale()
        state.scaler.update()
        state.skipped_steps += int(state.scaler.get_scale() < scale)  # it lowers its scale after a skipped step


def train_epoch(config, state, epoch, split, rows, tokens, device, run_log):
    """One pass over the training documents `rows`, in an order fixed by (seed, epoch); the epoch's averages.
    Windows of grad_accum batches; the last one of the epoch may be shorter. With --log-every N, a
    step record every N batches."""
    state.network.train()
    torch.manual_seed(seed_of(config.seed, epoch, state.rank))  # dropout: fixed per epoch (exact resume), new per rank
    totals, rewired, skipped = torch.zeros(3, dtype=torch.float64), 0, state.skipped_steps
    batches = data.batches(split, config.batch_size // state.world, shuffle=True, seed=config.seed, epoch=epoch,
                           tokens=tokens, rank=state.rank, world=state.world, even=True, rows=rows)
    # counted in documents (of all processes), so that its rate is documents per second
    progress = tqdm(total=len(rows) - len(rows) % state.world, desc=f"epoch {epoch + 1}/{config.epochs}", unit="doc",
                    unit_scale=True, mininterval=1.0, disable=None if state.rank == 0 else True, leave=False)
    since, since_totals, since_number = time.time(), totals.clone(), 0  # where the last step record left off
    for number, batch in enumerate(batches, start=1):
        before = (number - 1) // config.grad_accum * config.grad_accum  # batches of the epoch before this window
        window = min(config.grad_accum, state.batches_per_epoch - before)
        s, losses, step_rewired = train_step(config, state, batch.to(device), device, window, number - before == window)
        totals, rewired = totals + losses.cpu(), rewired + step_rewired
        progress.set_postfix(loss=f"{totals[0] / number:.4g}", s=f"{s:.2f}", refresh=False)
        progress.update(batch.size * state.world)
        if config.log_every and state.batches_done % config.log_every == 0:
            record = checkpoint.step_record(config, state, epoch, s, totals - since_totals, number - since_number,
                                            time.time() - since, device)
            run_log.write(record)
            if state.rank == 0:
                progress.write(f"batch {state.batches_done}: loss {record['loss']:.4g}, "
                               f"{record['ms_per_batch']:.0f} ms/batch, {record['documents_per_s']:.0f} documents/s")
            since, since_totals, since_number = time.time(), totals.clone(), number
    progress.close()
    loss, main_loss, aux_loss = (totals / state.batches_per_epoch).tolist()
    return {"loss": loss, "main": main_loss, "aux": aux_loss, "rewired": rewired, "aux_weight": s,
            "skipped_steps": state.skipped_steps - skipped}


def keep_best(state, epoch, evaluated):
    """After an evaluation: remember the one of best P@1 (True: the caller saves checkpoint.best.pt), count those
    without a better P@3 (--patience); both by the validation split when held out, else the test split (the release)."""
    chosen = evaluated.get("validation", evaluated)
    state.evaluations_since_best_p3 = 0 if chosen["P@3"] > state.best_p3 else state.evaluations_since_best_p3 + 1
    state.best_p3 = max(state.best_p3, chosen["P@3"])
    if chosen["P@1"] > state.best_evaluation.get("validation", state.best_evaluation).get("P@1", -1.0):
        state.best_evaluation = {"epoch": epoch + 1, **evaluated}
        return True
    return False


def run(config):
    """Train (or resume) and return the final metrics, in every process of a torchrun job (processes.py)."""
    with processes.joined(config.device) as (rank, world, device):
        return train_and_evaluate(config, rank, world, device)


def dry_run(xmc, state, tokens, seconds, device):
    """--dry-run, once everything is prepared: the sizes of what training would read and hold, how
    long preparing took (seconds) and the process's peak resident memory, as JSON (tools/rehearse.py
    reads it)."""
    report = {"train_documents": len(xmc.train), "test_documents": len(xmc.test), "labels": xmc.num_labels,
              "features": xmc.num_features, "clusters": 0 if state.clusters is None else int(state.clusters.max()) + 1,
              "token_cache_MB": sum(rows.nbytes for rows in tokens.values() if rows is not None) / 2**20,
              "parameters": sum(p.numel() for p in state.network.parameters()),
              **checkpoint.memory_report(state.network, device), **seconds,
              "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    print("dry run: " + json.dumps(report, indent=1))
    return report


def load_data(config, out, rank, world):
    """(source, xmc, clusters, tokens, seconds): the data set and what the model reads besides it
    (xc_files.prepare). Under torchrun, rank 0 builds the caches first, then the others find them
    built, and all start training together."""
    started, source = time.time(), xc_files.locate(config.data, config.data_dir)
    max_leaf = config.max_leaf if config.aux_weight > 0 or config.groups_by_clusters else None
    with processes.rank_zero_first(rank, world):
        xmc, clusters, tokens, seconds = xc_files.prepare(source, config.format, config.augment_labels,
                                                          (config.propensity_a, config.propensity_b), config.idf,
                                                          config.encoder, config.max_length, max_leaf, fallback=out)
    data.hold_out(xmc, config.validation_fraction, config.seed)
    features = f"{xmc.num_features:,} features, " if xmc.num_features else ""  # a transformer needs none
    validation = f" ({len(xmc.validation):,} of them held out for validation)" if xmc.validation is not None else ""
    print(f"{xmc.name}: {len(xmc.train):,} train{validation} / {len(xmc.test):,} test documents, {features}"
          f"{xmc.num_labels:,} labels ({time.time() - started:.1f}s)")
    return source, xmc, clusters, tokens or {"train": None, "test": None}, seconds


def frozen_outputs(config, encoder, tokens, cache_dir, device):
    """--freeze-encoder: the pooled outputs of every document, in a cache beside the token ids,
    keyed by the encoder's name, pooling and weights (their sums: a cheap check, not a hash)."""
    key = (config.encoder, config.pooling, [float(p.double().sum()) for p in encoder.parameters()])
    encoder.eval()

    def encode(batch_tokens):
        with torch.no_grad():
            return encoder.pool({name: t.to(device) for name, t in batch_tokens.items()})
    return {split: caches.pooled_cache(rows, encode, encoder.out_features, key, cache_dir) for split, rows in tokens.items()}


def start_from_data(config, network, xmc, train_tokens, device):
    """--classifier-init centroids (model.start_from_centroids), from the classifier's inputs of
    the training documents it fits, with dropout off."""
    fit, network = xmc.fit_rows(), network.eval()
    with torch.no_grad():
        hidden = torch.cat([network.inputs(batch.to(device))[1].cpu() for batch in
                            data.batches(xmc.train, config.eval_batch_size, tokens=train_tokens, rows=fit)])
    label_offsets, positions = data.csr_rows(xmc.train.label_offsets, fit)
    network.start_from_centroids(hidden, data.owners(label_offsets), data.as_long(xmc.train.label_ids[positions]))


def evaluate_splits(config, state, xmc, tokens, device):
    """P@k, nDCG@k, PSP@k on the test split, and under "validation" on the validation split when one
    is held out (under torchrun: each rank scores a share)."""
    def score(split, rows, split_tokens):
        batches = data.batches(split, config.eval_batch_size, tokens=split_tokens, rank=state.rank,
                               world=state.world, rows=rows)
        return evaluate.evaluate(state.network, xmc, batches, device, world=state.world, rows=rows,
                                 autocast=None if config.eval_fp32 else state.autocast)
    results = score(xmc.test, None, tokens["test"])
    if xmc.validation is not None:
        results["validation"] = score(xmc.train, xmc.validation, tokens["train"])
    return results


def train_and_evaluate(config, rank, world, device):
    """Set up; then per epoch: train, evaluate when due, log, checkpoint, stop when patience runs out."""
    torch.manual_seed(config.seed)
    out, started = Path(config.out), time.time()
    checkpoint.check_run_directory(out, config.resume, config.dry_run)
    if config.dry_run:  # first what a preset plus flags amount to, one `name = value` line per field
        print("\n".join(f"{name} = {value!r}" for name, value in dataclasses.asdict(config).items()))
    print(recipe(config))
    source, xmc, clusters, tokens, seconds = load_data(config, out, rank, world)
    config = lengthened(config, len(xmc.fit_rows()), world)  # --min-steps
    state = set_up(config, source, xmc, clusters, device, rank, world)
    if config.freeze_encoder:  # its outputs, computed once (by rank 0 first), instead of its token ids
        with processes.rank_zero_first(rank, world):
            tokens = frozen_outputs(config, state.network.encoder, tokens, caches.cache_dir(xmc, out), device)
    if config.classifier_init == "centroids" and not config.resume:
        start_from_data(config, state.network, xmc, tokens["train"], device)
    if config.dry_run:
        return dry_run(xmc, state, tokens, seconds, device)
    epochs_done = checkpoint.resume(out, state, config) if config.resume else 0
    announce(config, state, device)
    if rank == 0:
        checkpoint.prepare_out(config, state.network, out, epochs_done)
    run_log = checkpoint.RunLog(config, out, rank)
    results, epoch = {}, epochs_done - 1
    for epoch in range(epochs_done, config.epochs):  # 0-based here (the seeds'); epoch + 1 in logs and checkpoints
        epoch_start = time.time()
        trained = train_epoch(config, state, epoch, xmc.train, xmc.fit_rows(), tokens["train"], device, run_log)
        if not all(bool(torch.isfinite(p).all()) for p in state.network.parameters()):
            raise FloatingPointError(f"non-finite weights after batch {state.batches_done}; the checkpoint of the "
                                     f"epoch before is kept")
        evaluated, improved = {}, False
        if epoch + 1 == config.epochs or (epoch + 1) % config.eval_every == 0:
            results = evaluated = evaluate_splits(config, state, xmc, tokens, device)
            improved = keep_best(state, epoch, evaluated)
        record = checkpoint.epoch_record(state, epoch, trained, evaluated, time.time() - epoch_start, device)
        print(f"epoch {epoch + 1}: loss {record['loss']:.4g} (aux weight {record['aux_weight']:.2f}), rewired "
              f"{record['rewired']:,}" + (f", P@1 {results['P@1']:.2f} P@5 {results['P@5']:.2f}" if evaluated else "")
              + (f" (validation P@1 {results['validation']['P@1']:.2f})" if "validation" in evaluated else "")
              + (f"; the fp16 loss scaler skipped {record['skipped_steps']} steps" if record["skipped_steps"] else ""))
        run_log.write(record)
        if rank == 0:
            checkpoint.save_epoch(out, checkpoint.checkpoint_state(state, epoch + 1, config), best=improved)
        if config.patience and state.evaluations_since_best_p3 >= config.patience:
            print(f"early stop: {'test' if xmc.validation is None else 'validation'} P@3 has not improved for "
                  f"{state.evaluations_since_best_p3} evaluations")
            break
    report(config, state, xmc, results, epoch, time.time() - started, device)
    run_log.close()
    return results


def announce(config, state, device):
    memory = checkpoint.memory_report(state.network, device)
    print(f"classifier: {'sparse, fan-in ' + str(config.fan_in) if config.sparse else 'dense'}; parameters + AdamW "
          f"state {memory['classifier_MB']:.1f} MB (dense: {memory['dense_classifier_MB']:.1f} MB); device {device}"
          + (f", {state.world} processes" if state.world > 1 else ""))


def report(config, state, xmc, results, epoch, seconds, device):
    """The final table: the last epoch's metrics and the best epoch's."""
    print(f"\n{xmc.name}, {'sparse' if config.sparse else 'dense'} classifier, {epoch + 1} epochs in {seconds:.0f}s:")
    if results:
        best = state.best_evaluation
        chosen = f"best {'validation' if 'validation' in best else 'test'} P@1, epoch {best['epoch']}"
        print(evaluate.table((f"last, epoch {epoch + 1}", results), (chosen, best)))
    if device.type == "cuda":
        print(f"peak GPU memory {checkpoint.memory_report(state.network, device)['peak_gpu_MB']:.0f} MB")


def main():
    try:
        run(parse_config())
    except (ValueError, OSError, FloatingPointError) as error:  # DataError too; OSError names its path
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
