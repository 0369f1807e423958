"""benchmarks/gpu_t1.py, the GPU run of #8, on the CPU at a tiny width: the same path (train a
VGG16 T1 market, slice all 10 pairs with the Ray slice job, pack, write JSON) end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from jsonout import last_json
from test_engine import REPO, _env
from test_market import assert_is_test_accuracy, assert_stored_test_accuracy

from snp_ray.market.tasks import get_task, target_sets
from snp_ray.runtime import resolve_precision


def test_gpu_t1_script_runs_end_to_end_on_cpu_at_tiny_width(real_data, tmp_path):
    out = tmp_path / "gpu_t1.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_t1.py"), "--width", "0.0625", "--epochs", "1",
           "--train-fraction", "0.05", "--preset", "smoke", "--targets", "1",
           "--root", str(tmp_path / "market"), "--out", str(out)]
    env = {**_env(), "SNP_DEVICE": "cpu"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    assert summary["fragments"] == 10
    # the actors report where they sliced: the CPU, in the arithmetic auto picks on this CPU
    expected = "cpu/" + resolve_precision("auto", torch.device("cpu"))
    assert summary["sliced_on"] == {expected: 10}
    result = json.loads(out.read_text())
    assert result["slice"]["fragments_done"] == 10 and result["slice"]["failed"] == 0
    assert len(result["original_models"]) == 3
    assert not any(m["train_on_gpu"] for m in result["original_models"])
    market = tmp_path / "market" / "vgg16-w0.0625-e1"
    for m in result["original_models"]:   # each reported accuracy is that of the stored weights
        assert_stored_test_accuracy(market, m["id"], m["test_accuracy"])
    assert summary["models_test_accuracy"] == [m["test_accuracy"] for m in result["original_models"]]
    # the pack is not stored, so its accuracy cannot be recomputed here; it must still be a count
    # of correct predictions over the 3000 test rows of the first seeded T1 target set
    (pack,) = result["packs"]
    assert pack["classes"] == list(target_sets(get_task("T1"), 1, 0)[0])
    assert assert_is_test_accuracy(pack["accuracy"], "cifar10", pack["classes"]) == 3000
    assert result["mean_pack_accuracy"] == summary["mean_pack_accuracy"] == pack["accuracy"]
    assert len(result["slice"]["seconds_per_fragment"]) == 10
    assert result["slice"]["peak_rss_mb_per_actor"] and all(
        50 < v < 64_000 for v in result["slice"]["peak_rss_mb_per_actor"].values())
