"""Run directories, checkpoints and the run log with its records: the plumbing beside train.py (a
paper reader can skip this file). Everything a run writes goes through here, atomically, and
evaluate.py and plot.py read it back through here.

A run directory <out>/ holds
  checkpoint.pt           the newest epoch's state; --resume continues from it exactly
  checkpoint.previous.pt  the one before (--resume falls back to it if the newest is damaged)
  checkpoint.best.pt      the epoch of best P@1: validation's when held out, else test's
  log.jsonl               a JSON line per epoch (and per --log-every batches, "kind": "step")
  encoder/                a transformer's config and tokenizer (evaluate.py rebuilds from them)

A checkpoint is a dict (torch.save; read with weights_only=True). Written by train.py
(`checkpoint_state`); read back by train.py --resume (`restore`, `check_compatible`), by evaluate.py
(evaluation and --predict) and by plot.py. Its keys: the train.TrainingState fields of RESUMED,
under their own names (state dicts for what has one), and
  epochs_done      epochs done, counted from 1 as in log.jsonl      resume
  config           every Config field of the run                    evaluate (precision), a record
  model_arguments  model.build's arguments                          resume (compatibility), evaluate, plot
  inputs           label_names; a bag-of-words model's vocabulary (raw text) and feature_weights     evaluate
  label_counts     training documents per label                     plot (head vs tail)
  max_length       tokens per document (None: the bag-of-words encoder)     evaluate
  data_arguments   xc_files.load's arguments (source folder, format, ...)   evaluate
evaluate.py and plot.py read the weights under "network".
"""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

import caches


# ---------------------------------------------------------------------------------------------
# The run directory.

def check_run_directory(out, resume, dry_run):
    """Refuse, before any work, to start a run over another run's files, or to resume from nothing."""
    existing = [path for path in checkpoint_files(out) if path.exists()]
    if resume and not existing:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    if not resume and not dry_run and (existing or (out / "log.jsonl").exists()):
        found = (existing or [out / "log.jsonl"])[0]
        raise FileExistsError(f"{found} exists: pass --resume to continue that run, or choose another --out")


def prepare_out(config, network, out, epochs_done):
    """The run directory (rank 0): created, cleared of what a killed run left half-written, given the
    encoder's config and tokenizer; a resumed run's log cut back to its checkpoint's epoch."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".checkpoint*.tmp*"):
        stale.unlink()
    for stale in out.glob(".encoder.tmp*"):
        shutil.rmtree(stale)
    save_encoder(config, network, out)
    if config.resume and (out / "log.jsonl").exists():
        trim_log(out / "log.jsonl", epochs_done)


def save_encoder(config, network, out):
    """A transformer's config and tokenizer, into <out>/encoder (written whole, then renamed):
    evaluate.py and --predict rebuild the model from them and the checkpoint's weights, with no
    model hub and no original folder."""
    folder = out / "encoder"
    if config.encoder == "bow" or folder.exists():
        return
    temporary = out / f".encoder.tmp{os.getpid()}"
    caches.load_tokenizer(config.encoder).save_pretrained(temporary)
    network.encoder.transformer.config.save_pretrained(temporary)
    os.replace(temporary, folder)


def encoder_folder(run):
    """<run>/encoder: a transformer's config and tokenizer, which train.py saves beside its checkpoints."""
    folder = Path(run) / "encoder"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is missing: train.py saves the encoder's config and tokenizer there, "
                                f"beside the checkpoints; keep the run's folder together")
    return str(folder)


# ---------------------------------------------------------------------------------------------
# Checkpoints.

def checkpoint_files(out):
    """Newest first: the order in which --resume tries them."""
    return [Path(out) / "checkpoint.pt", Path(out) / "checkpoint.previous.pt"]


def save_checkpoint(path, saved, keep_previous=True):
    """Write to a temporary file and flush it to disk; then the current checkpoint becomes the
    previous one (keep_previous), and the temporary file the current one (renames are atomic). A
    kill at any moment leaves at least one complete checkpoint and never half of one; between the
    two renames only the previous one exists, and --resume falls back to it."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as f:
        torch.save(saved, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, checkpoint_files(path.parent)[1])
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)  # make the renames themselves durable
    os.fsync(directory)
    os.close(directory)


def save_epoch(out, saved, best):
    """An epoch's checkpoint: checkpoint.pt (the one before kept as checkpoint.previous.pt), and
    checkpoint.best.pt too when the epoch is the best so far."""
    if best:
        save_checkpoint(out / "checkpoint.best.pt", saved, keep_previous=False)
    save_checkpoint(out / "checkpoint.pt", saved)


def resume(out, state, config):
    """--resume: the newest readable checkpoint of the same model and data, restored into `state`;
    returns its epochs done."""
    path, saved = load_latest_checkpoint(out)
    check_compatible(path, saved, state, config)
    epochs_done = restore(state, saved)
    print(f"resumed from {path} after epoch {epochs_done} (batch {state.batches_done})")
    return epochs_done


def load_latest_checkpoint(out):
    """(path, saved) of the newest checkpoint in `out` that loads."""
    for path in checkpoint_files(out):
        if path.exists():
            try:
                return path, load_checkpoint(path)
            except ValueError as error:
                print(f"warning: {error}; skipped")
    raise FileNotFoundError(f"--resume: no readable checkpoint in {out}")


# The train.TrainingState fields a checkpoint saves and --resume restores, by name: what a resumed
# run needs to continue bit for bit. Every other field is named in NOT_RESUMED, with the reason.
RESUMED = ("network", "optimizers", "schedulers", "scaler",  # their state dicts
           "batches_done", "last_regrown", "best_evaluation", "best_p3", "evaluations_since_best_p3")
NOT_RESUMED = {
    "replica": "the network, wrapped anew by set_up under torchrun",
    "rewire_schedule": "built by set_up from the config", "clusters": "read from their cache by set_up",
    "autocast": "from the config and the device", "batches_per_epoch": "from the config and the data",
    "rebuild": "saved beside, for evaluate.py and plot.py", "rank": "this process's", "world": "this job's",
    "last_survival": "a statistic of the last rewire, logged in its epoch's record",
    "skipped_steps": "counted in each epoch's record", "non_finite_in_a_row": "0 after a checkpoint's epoch",
}


def checkpoint_state(state, epochs_done, config):
    """The checkpoint of a train.TrainingState after `epochs_done` epochs (keys: the module docstring)."""
    def saved_form(value):  # what has a state dict (network, optimizers, ...) is saved as its state dict
        if isinstance(value, list):
            return [saved_form(each) for each in value]
        return value.state_dict() if hasattr(value, "state_dict") else value
    saved = {name: saved_form(getattr(state, name)) for name in RESUMED}
    return {**saved, "epochs_done": epochs_done, "config": dataclasses.asdict(config), **state.rebuild}


def check_compatible(path, saved, state, config):
    """Refuse a checkpoint of another model or data set in one line (other options may change)."""
    ignored = ("backend",)  # how the layer is computed, not what it is
    old = {**saved["model_arguments"], "data": saved["data_arguments"].get("source")}
    new = {**state.rebuild["model_arguments"], "data": state.rebuild["data_arguments"]["source"]}
    different = [f"{k} {old.get(k)!r} there, {v!r} here" for k, v in new.items() if k not in ignored and old.get(k) != v]
    if saved["inputs"].get("vocabulary") != state.rebuild["inputs"]["vocabulary"]:  # its order is the feature ids
        different.append("another vocabulary of the training texts here (have they changed?)")
    if different:
        raise ValueError(f"{path} belongs to another model: {'; '.join(different)}. Resume with the options "
                         f"it was trained with, or start a new run with another --out")


def trim_log(path, epochs_done):
    """Keep the records of the first `epochs_done` epochs, rewritten atomically: a fallback to an
    older checkpoint leaves later ones, a kill during a write half a line."""
    def wanted(line):
        try:
            return json.loads(line)["epoch"] <= epochs_done
        except (ValueError, KeyError, TypeError):
            return False
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text("".join(line + "\n" for line in path.read_text().splitlines() if wanted(line)))
    os.replace(temporary, path)


def restore(state, saved):
    """The inverse of checkpoint_state; returns the epochs done."""
    for name in RESUMED:
        current = getattr(state, name)
        if isinstance(current, list):  # the optimizers, their schedulers
            for each, entry in zip(current, saved[name]):
                each.load_state_dict(entry)
        elif hasattr(current, "load_state_dict"):  # the network, the scaler
            current.load_state_dict(saved[name])
        else:
            setattr(state, name, saved[name])
    if state.last_regrown is not None:  # saved from the GPU, loaded to the CPU (map_location): back beside the weights
        state.last_regrown = state.last_regrown.to(next(state.network.parameters()).device)
    return saved["epochs_done"]


def load_checkpoint(path):
    """A checkpoint written by train.py, on the CPU; a missing, damaged, foreign or outdated file
    is a one-line error."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    except Exception as error:  # a damaged or foreign file fails in many ways (zip, pickle, EOF, index errors)
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(saved, dict) or "model_arguments" not in saved:
        raise ValueError(f"{path} is not a checkpoint written by train.py")
    if "epochs_done" not in saved:
        raise ValueError(f"{path} was written by an older train.py, whose checkpoints this one cannot rebuild")
    return saved


# ---------------------------------------------------------------------------------------------
# The run log.

class RunLog:
    """The run's records (rank 0): appended to <out>/log.jsonl and, with --wandb, sent to Weights &
    Biases (imported only then). Epoch records as they always were; step records carry "kind": "step"."""

    def __init__(self, config, out, rank):
        self.path = out / "log.jsonl" if rank == 0 else None
        self.wandb = None
        if rank == 0 and config.wandb:
            import wandb  # noqa: only when asked (Config checked that it is installed)
            self.wandb = wandb.init(project=config.wandb_project, name=config.wandb_name or None,
                                    config=dataclasses.asdict(config))

    def write(self, record):
        if self.path is None:
            return
        with open(self.path, "a") as log:
            log.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.wandb.log({("step/" if record.get("kind") == "step" else "") + k: v for k, v in numbers.items()},
                           step=record["batch"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def step_record(config, state, epoch, s, losses, batches, seconds, device):
    """The record of the last `batches` training batches: their mean losses, the learning rates,
    speed, and the GPU's peak memory so far."""
    loss, main_loss, aux_loss = (losses / batches).tolist()
    record = {"kind": "step", "epoch": epoch + 1, "batch": state.batches_done, "loss": loss, "main": main_loss,
              "aux": aux_loss, "aux_weight": s,
              "lr": [g["lr"] for optimizer in state.optimizers for g in optimizer.param_groups],
              "ms_per_batch": 1e3 * seconds / batches, "documents_per_s": batches * config.batch_size / seconds}
    if device.type == "cuda":
        record["peak_gpu_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return record


def epoch_record(state, epoch, trained, evaluated, seconds, device):
    """The epoch's line of log.jsonl: its training averages, rewiring, learning rates, memory, metrics."""
    survived = state.last_survival if trained["rewired"] else None  # an epoch without a rewire has none
    return {**trained, "epoch": epoch + 1, "batch": state.batches_done, "survived": survived,
            "lr": [group["lr"] for optimizer in state.optimizers for group in optimizer.param_groups],
            "seconds": seconds, **memory_report(state.network, device), **evaluated,
            "best_epoch": state.best_evaluation.get("epoch"), "best_P@1": state.best_evaluation.get("P@1")}


def memory_report(network, device):
    """The classifier's bytes and a dense one's (with AdamW's state), and the GPU's peak so far."""
    sparse_bytes, dense_bytes = network.classifier_bytes()
    report = {"classifier_MB": sparse_bytes / 2**20, "dense_classifier_MB": dense_bytes / 2**20}
    if device.type == "cuda":
        report["peak_gpu_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return report
