"""napkinXC's probabilistic label tree (PLT), default settings, on a bag-of-words data set: the
baseline column of the README's real-data table, scored by evaluate.py's metrics with the same
label ids and propensities as train.py. With --validation-fraction it fits on the training documents
that train.py fits on with the same --seed and scores the ones train.py holds out: a comparison
that reads no test split. napkinXC is not a dependency; install it for this only:

    pip install napkinxc
    python tools/baseline.py --data ../shared/data/enron
    python tools/baseline.py --data ../shared/data/enron --validation-fraction 0.1 --seed 0
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, one folder up
import data  # noqa: E402
import evaluate  # noqa: E402
import xc_files  # noqa: E402


def csr(split, num_features):
    import scipy.sparse  # napkinXC's dependency, not this project's
    return scipy.sparse.csr_matrix((split.bag_values, split.bag_ids, split.bag_offsets),
                                   shape=(len(split), num_features))


def label_lists(split, rows):
    return [split.labels_of(row).tolist() for row in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a folder with train.txt and test.txt (the XC bag-of-words files)")
    p.add_argument("--out", default="/tmp/napkinxc-plt", help="where napkinXC writes its model")
    p.add_argument("--validation-fraction", type=float, default=0.0,
                   help="> 0: score train.py's validation split of this share, not the test split")
    p.add_argument("--seed", type=int, default=0, help="the seed that draws the validation split, as train.py's")
    args = p.parse_args(argv)
    try:
        from napkinxc.models import PLT  # here, so that --help works without it
    except ImportError:
        sys.exit("error: tools/baseline.py needs napkinXC, which the project does not install: pip install napkinxc")
    try:
        xmc = xc_files.load(args.data, format="bow")
        data.hold_out(xmc, args.validation_fraction, args.seed)
    except (ValueError, OSError) as error:  # xc_files' DataError too: one line naming the file
        sys.exit(f"error: {error}")
    train = csr(xmc.train, xmc.num_features)
    start = time.perf_counter()
    plt = PLT(args.out)  # napkinXC's defaults: it makes no choice that a validation split would guide
    plt.fit(train[xmc.fit_rows()], label_lists(xmc.train, xmc.fit_rows()))
    if xmc.validation is None:
        scored = csr(xmc.test, xmc.num_features)
        label_offsets, label_ids = xmc.test.label_offsets, xmc.test.label_ids
    else:
        scored = train[xmc.validation]
        label_offsets, positions = data.csr_rows(xmc.train.label_offsets, xmc.validation)
        label_ids = xmc.train.label_ids[positions]
    predictions = plt.predict(scored, top_k=max(evaluate.KS))
    seconds = time.perf_counter() - start
    # Fewer than 5 predictions (few labels pass the tree): pad with a label id that is never true.
    padded = np.array([row + [xmc.num_labels] * (max(evaluate.KS) - len(row)) for row in predictions])
    inverse = evaluate.inverse_propensities(xmc.label_frequencies(), len(xmc.train), *xmc.propensity)
    results = evaluate.metrics(padded, label_offsets, label_ids, np.append(inverse, 0.0))
    print(evaluate.table((f"napkinXC PLT, {'test' if xmc.validation is None else 'validation'}", results)))
    print(f"{xmc.name}: fit and predict in {seconds:.1f} s")


if __name__ == "__main__":
    main()
