"""Made-up manifest rows with tiny weights, for the manifest-scale benchmark and store tests only:
real fragments cost seconds each to slice, and the manifest's behaviour at 10^5 rows does not
depend on what the weights hold."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator

from snp_ray.slicing.fragment import fragment_key

DIGEST = "synthetic"


def synthetic_rows(n: int, classes: int = 100, start: int = 0, blobs: int = 64,
                   per_model: int | None = None) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Rows ``start .. start + n - 1``: row i is class ``i % classes`` of model ``i // per_model``
    (default: ``classes`` fragments per model), with one of ``blobs`` distinct tiny weight blobs
    (content addressing shares them, so the blob count stays small)."""
    per_model = per_model or classes
    for i in range(start, start + n):
        c, m = i % classes, i // per_model
        sha = hashlib.sha256(f"synthetic-model-{m}".encode()).hexdigest()
        spec = json.dumps({"synthetic": True, "model": m, "class_id": c,
                           "kept": {"0": list(range(c % 7, 24, 3))}})
        yield ({"key": fragment_key(sha, c, DIGEST, 5, 0), "model_id": f"synthetic-{m}",
                "model_sha256": sha, "class_id": c, "class_name": f"class{c}",
                "config_digest": DIGEST, "k": 5, "fewshot_seed": 0, "arch": "synthetic",
                "kept": json.dumps({"0": 8}), "feature_dim": 8, "params": 100 + c,
                "source_params": 1000, "flops": 10_000, "metrics": "{}", "seconds": 0.01,
                "spec": spec}, f"synthetic weights {i % blobs}".encode())
