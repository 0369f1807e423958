"""The numbers behind the learning canaries of tests/test_learning.py, printed as one JSON object:
fragment AUCs from a trained and an untrained source, pack accuracy with learning and with lr = 0,
the consistency MSE with and without gamma, and the l2,1 ratios of ability pooling with and
without alpha. The measurements are the ones the tests assert on, from tests/synthetic.py and
``Slicer.pooling_l21``. ``python benchmarks/canary_numbers.py`` (about 30 s, no data needed)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import synthetic  # noqa: E402
from conftest import as_fragment  # noqa: E402

from snp_ray.slicing import Slicer, slice_preset  # noqa: E402


def main() -> dict:
    torch.set_num_threads(1)
    model = synthetic.trained_model()
    held = synthetic.shapes(60, seed=7)
    slicer, outs = synthetic.slice_all(model)
    _, random_outs = synthetic.slice_all(synthetic.untrained_model())
    frags = [as_fragment(o, slicer, "vgg11", 0.125, c, 0) for c, o in enumerate(outs)]
    out = {"source_accuracy": synthetic.accuracy(model, 100, seed=2),
           "auc_trained": [synthetic.probe_auc(o, *held, c) for c, o in enumerate(outs)],
           "auc_untrained": [synthetic.probe_auc(o, *held, c) for c, o in enumerate(random_outs)],
           "pack_accuracy": synthetic.pack_accuracy(frags, held),
           "pack_accuracy_lr0": synthetic.pack_accuracy(frags, held, lr=0.0)}
    for gamma in (1.0, 0.0):
        s = Slicer(model, synthetic.SPEC, synthetic.fewshot(synthetic.K), slice_preset("quick", gamma=gamma))
        out[f"consistency_mse_gamma{gamma:g}"] = s.slice_class(1).metrics["fewshot_consistency_mse"]
    for alpha in (1e-2, 0.0):
        s = Slicer(model, synthetic.SPEC, synthetic.fewshot(10), slice_preset("quick", alpha=alpha))
        y, ratios = (s.labels == 1).long(), []
        for g in s.graph.groups[:4]:
            before, after = s.pooling_l21(g.id, y, torch.Generator().manual_seed(0))
            ratios.append(after / before)
        out[f"l21_ratio_alpha{alpha:g}"] = ratios
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
