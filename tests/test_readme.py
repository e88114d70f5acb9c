"""The README's example of the layer in someone else's model runs as written."""
import re
from pathlib import Path

import torch

from sparse_layer import FixedFanInLinear


def test_the_readmes_example_runs_as_written():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## The layer in your own model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    classifier = namespace["classifier"]
    assert isinstance(classifier, FixedFanInLinear) and torch.isfinite(namespace["loss"])
    assert all(len(set(row.tolist())) == 32 for row in classifier.indices)  # SET kept fan-in 32, distinct
    assert classifier(torch.randn(2, 768)).is_contiguous()
