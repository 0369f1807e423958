"""The evaluation API: the only door to a dataset's test split.

Slicing, packing and tuning receive few-shot sets, never this module, and a test checks that
none of them imports it.
"""
from __future__ import annotations

import numpy as np

from snp_ray.data.tables import EVAL_ACCESS, Split, read_split
from snp_ray.errors import DataError


def load_test_split(dataset: str, classes: list[int] | None = None) -> Split:
    """Test rows of ``dataset``, restricted to ``classes`` (global ids) when given."""
    split = read_split(dataset, "test", access=EVAL_ACCESS)
    if classes is None:
        return split
    unknown = sorted(set(classes) - set(range(split.num_classes)))
    if unknown:
        raise DataError(f"classes {unknown} are not classes of {dataset}")
    return split.rows(np.flatnonzero(np.isin(split.labels, classes)))
