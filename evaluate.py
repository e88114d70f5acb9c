"""Evaluation (paper, Section 5): precision@k, nDCG@k and propensity-scored precision PSP@k.

Scores are reduced to the top-k labels batch by batch, so no [N_test, L] score matrix is ever
built. PSP uses the propensities of Jain et al. (2016),
    p_l = 1 / (1 + C (N_l + B)^-A),   C = (log N - 1) (B + 1)^A,
with N training documents, N_l of them with label l, and the data set's A, B (train.py's
--propensity-a/-b: Amazon 0.6/2.6, Wikipedia 0.5/0.4, otherwise 0.55/1.5). PSP@k is normalised by
the best value any ranking could reach (the true labels of highest 1/p first), as the XC
repository reports it. A document without labels counts as 0 in P@k and nDCG@k. On LF data sets
the pairs of filter_labels_test.txt are taken out of each document's ranking before its top-k
(the release's filtered evaluation); the ground truth stays as it is.

`--predict FILE` (or `-` for standard input) applies a checkpoint to new documents, one per line,
and prints for each a line of its top-k labels as `name:score`, best first.

    python evaluate.py --checkpoint runs/synthetic/checkpoint.pt
    python evaluate.py --checkpoint runs/amazon670k/checkpoint.pt --predict new_products.txt --top-k 5
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import caches
import data
import model
import xc_files
from checkpoint import encoder_folder, load_checkpoint
from config import autocast_dtype
from data import csr_rows

KS = (1, 3, 5)


def inverse_propensities(label_frequencies, num_train, a=0.55, b=1.5):
    c = (np.log(num_train) - 1) * (b + 1) ** a
    return 1 + c * (label_frequencies + b) ** -a


@torch.no_grad()
def predict_top_k(network, batches, k, device, autocast=None):
    """[N, k] label ids of the k highest scores, best first, and their scores; the model under the
    training run's autocast (a dtype; None: fp32), as it was trained."""
    network.eval()
    device = torch.device(device)
    labels, scores = [], []
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            batch_scores = network(batch)[0]
        if batch.excluded_rows is not None:  # filtered evaluation: these pairs are never ranked
            batch_scores[batch.excluded_rows, batch.excluded_labels] = -torch.inf
        values, indices = top_k(batch_scores, min(k, batch_scores.shape[1]))
        labels.append(indices.cpu())
        scores.append(values.float().cpu())
    return torch.cat(labels).numpy(), torch.cat(scores).numpy()


def top_k(scores, k):
    """(values, indices) of the k highest of each row of [B, L] scores, best first. The sparse
    layer's scores are a [B, L] view of an [L, B] buffer: CUDA's top-k copies a non-contiguous input
    first (0.64 GiB at Amazon-670K, B = 256), so it runs down the buffer's columns instead."""
    if not scores.is_contiguous() and scores.T.is_contiguous():  # the layer's transposed view
        values, indices = scores.T.topk(k, dim=0)
        return values.T, indices.T
    return scores.topk(k, dim=1)


def hits(predictions, label_offsets, label_ids, num_labels):
    """[N, K] bool: is predictions[i, r] a true label of document i?"""
    docs = np.repeat(np.arange(len(label_offsets) - 1), np.diff(label_offsets))
    truth = np.sort(docs * num_labels + label_ids)
    asked = np.arange(len(predictions))[:, None] * num_labels + predictions
    found = np.searchsorted(truth, asked).clip(max=max(len(truth) - 1, 0))
    return truth[found] == asked if len(truth) else np.zeros(predictions.shape, dtype=bool)


def best_propensity_gain(label_offsets, label_ids, inverse_propensity, k):
    """Per document: the sum of the k largest 1/p among its true labels."""
    docs = np.repeat(np.arange(len(label_offsets) - 1), np.diff(label_offsets))
    gains = inverse_propensity[label_ids]
    order = np.lexsort((-gains, docs))  # by document, then by gain, highest first
    rank = np.arange(len(order)) - label_offsets[docs[order]]
    keep = order[rank < k]
    return np.bincount(docs[keep], weights=gains[keep], minlength=len(label_offsets) - 1)


def metrics(predictions, label_offsets, label_ids, inverse_propensity, ks=KS):
    """{"P@k", "nDCG@k", "PSP@k"} in percent for every k in ks; predictions is [N, >= max(ks)]."""
    relevant = hits(predictions, label_offsets, label_ids, len(inverse_propensity))
    counts = np.diff(label_offsets)
    discount = 1 / np.log2(np.arange(2, predictions.shape[1] + 2))
    results = {}
    for k in ks:
        top = relevant[:, :k]
        results[f"P@{k}"] = float(100 * top.sum(1).mean() / k)  # plain floats: they go into checkpoints
        ideal = np.concatenate([[0], np.cumsum(discount[:k])])[np.minimum(counts, k)]
        dcg = (top * discount[:k]).sum(1)
        results[f"nDCG@{k}"] = float(100 * np.mean(np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)))
        gain = (top * inverse_propensity[predictions[:, :k]]).sum()
        best = best_propensity_gain(label_offsets, label_ids, inverse_propensity, k).sum()
        results[f"PSP@{k}"] = float(100 * gain / best) if best > 0 else 0.0
    return results


def evaluate(network, xmc, batches, device, ks=KS, world=1, rows=None, autocast=None):
    """Metrics on the test split, or on the training documents `rows` (the validation split) that
    `batches` holds in that order. Under torchrun (world > 1), each process has scored every
    world-th document (data.batches with rank and world); the shares are gathered here, in order."""
    predictions, _ = predict_top_k(network, batches, max(ks), device, autocast)
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, predictions)
        predictions = np.empty((sum(map(len, shares)), shares[0].shape[1]), dtype=shares[0].dtype)
        for rank, share in enumerate(shares):  # rank r scored documents r, r + world, ...
            predictions[rank::world] = share
    inverse = inverse_propensities(xmc.label_frequencies(), len(xmc.train), *xmc.propensity)
    if rows is None:
        return metrics(predictions, xmc.test.label_offsets, xmc.test.label_ids, inverse, ks)
    label_offsets, positions = csr_rows(xmc.train.label_offsets, rows)
    return metrics(predictions, label_offsets, xmc.train.label_ids[positions], inverse, ks)


def table(*evaluations, ks=KS):
    """Markdown: a row per metric and evaluation, given as (label, results) pairs; columns @k."""
    lines = ["| metric | " + " | ".join(f"@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for name in ("P", "nDCG", "PSP"):
        for label, results in evaluations:
            lines.append(f"| {name} ({label}) | " + " | ".join(f"{results[f'{name}@{k}']:.2f}" for k in ks) + " |")
    return "\n".join(lines)


def load_model(saved, device, run):
    """The checkpoint's model. A transformer is rebuilt from the run's own config (`from_config`) and
    the checkpoint's weights: neither a model hub nor the original model folder is needed."""
    arguments = dict(saved["model_arguments"])
    if arguments["encoder"] != "bow":
        arguments.update(encoder=encoder_folder(run), pretrained=False)
    network = model.build(**arguments)
    network.load_state_dict(saved["network"])
    return network.to(device)


def feature_weights(inputs):
    """A bag-of-words model's feature weights, as numpy (None: raw values)."""
    weights = inputs["feature_weights"]
    return None if weights is None else weights.numpy()


def run_autocast(saved, device):
    """The autocast dtype (or None) that the checkpoint's run evaluated under, on `device`."""
    config = saved["config"]
    return None if config.get("eval_fp32") else autocast_dtype(config["precision"], torch.device(device))


def load_for_evaluation(path, batch_size, device):
    """The model of a checkpoint written by train.py, its data set, test batches (bags of words
    through the checkpoint's vocabulary, or tokens from the cache training built) and run_autocast."""
    saved, run = load_checkpoint(path), Path(path).parent
    xmc = xc_files.load(**saved["data_arguments"])
    inputs, tokens = saved["inputs"], None
    if saved["max_length"] is None:
        data.attach_bags(xmc, ("test",), inputs["vocabulary"], feature_weights(inputs))
    else:
        tokens = caches.token_cache(xmc.test, encoder_folder(run), saved["max_length"], caches.cache_dir(xmc, run))
    return (load_model(saved, device, run), xmc, data.batches(xmc.test, batch_size, tokens=tokens),
            run_autocast(saved, device))


def predict(saved, run, lines, k, batch_size, device, where):
    """Lines "name:score name:score ..." of the top-k labels of each document in `lines`, by the
    model of a checkpoint (`saved`) in the run folder `run`."""
    if not lines:
        return []
    inputs, shape = saved["inputs"], saved["model_arguments"]
    if saved["max_length"] is None:  # a bag-of-words model: bags through its vocabulary, or f:v lines
        split, tokens = xc_files.documents(lines, shape["num_features"], shape["num_labels"], inputs["vocabulary"],
                                           feature_weights(inputs), where), None
        empty = int((np.diff(split.bag_offsets) == 0).sum())
        if empty:
            print(f"{where}: {empty} documents have no known word or feature; their labels come from the biases "
                  f"alone", file=sys.stderr)
    else:  # a transformer reads the texts through the run's own tokenizer
        split = data.Split(np.zeros(len(lines) + 1, np.int64), np.zeros(0, np.int32), texts=lines)
        tokens = caches.tokenize(lines, caches.load_tokenizer(encoder_folder(run)), saved["max_length"])
    network = load_model(saved, device, run)
    labels, scores = predict_top_k(network, data.batches(split, batch_size, tokens=tokens), k, device,
                                   run_autocast(saved, device))
    names = inputs["label_names"] or range(shape["num_labels"])
    return [" ".join(f"{names[l]}:{s:.4f}" for l, s in zip(row_labels, row_scores))
            for row_labels, row_scores in zip(labels, scores)]


def main():
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on its data set's test split, or "
                                                 "predict the labels of new documents.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--predict", metavar="FILE", help="documents, one per line ('-': standard input): raw text, "
                        "or 'f:v f:v ...' for models trained on bag-of-words data")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    try:
        if args.predict:
            saved = load_checkpoint(args.checkpoint)
            where = "<stdin>" if args.predict == "-" else args.predict
            lines = [line for _, line in xc_files.read_lines("/dev/stdin" if args.predict == "-" else args.predict)]
            run = Path(args.checkpoint).parent
            for line in predict(saved, run, lines, args.top_k, args.batch_size, args.device, where):
                print(line)
        else:
            network, xmc, test_batches, autocast = load_for_evaluation(args.checkpoint, args.batch_size, args.device)
            print(table(("test", evaluate(network, xmc, test_batches, args.device, autocast=autocast))))
    except (ValueError, OSError) as error:  # data.DataError is a ValueError; an OSError names its path
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
