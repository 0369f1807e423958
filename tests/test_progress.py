"""Progress on long work: one log line per training epoch, forwarded from Ray workers to the
driver without Ray folding the models' lines together, and no token-auth notice on a local start."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from snp_ray.data.tables import read_split
from snp_ray.market.training import TrainConfig, train_original

REPO = Path(__file__).resolve().parents[1]
EPOCH_LINE = re.compile(r"^tiny-m0 epoch (\d+)/3: loss \d+\.\d{4}, train acc [01]\.\d{4}, \d+\.\d s$")


def test_training_logs_one_line_per_epoch(tiny_root, caplog):
    split = read_split("cifar10", "train")
    with caplog.at_level("INFO", logger="snp_ray.market.training"):
        train_original(split, [0, 1, 2], "vgg11", 0.125,
                       TrainConfig(epochs=3, batch_size=8, augment=False), label="tiny-m0")
    epochs = [int(m.group(1)) for r in caplog.records
              if r.name == "snp_ray.market.training" and (m := EPOCH_LINE.match(r.getMessage()))]
    assert epochs == [1, 2, 3], caplog.text


# Three actors (three worker processes) log lines that differ only in numbers, as the models'
# epoch lines do; Ray would print the first and fold the others into one
# "<last line> [repeated 2x across cluster]", so the middle model's line would never show.
_DRIVER = """
import logging, sys, time
from snp_ray.runtime import ensure_ray
ensure_ray(num_cpus=1)
import ray

@ray.remote(num_cpus=0)
class Trainer:
    def epoch(self, line):
        from snp_ray.runtime import worker_logging
        worker_logging()
        logging.getLogger("snp_ray.market.training").info(line)
        return 1

trainers = [Trainer.remote() for _ in range(3)]
assert ray.get([t.epoch.remote(f"T1-m{i}-vgg11-w0.25 epoch 1/12: loss 2.{i}000, 1{i}.0 s")
                for i, t in enumerate(trainers)]) == [1, 1, 1]
time.sleep(4)   # the driver prints forwarded worker lines asynchronously
ray.shutdown()
"""


def test_worker_epoch_lines_reach_the_driver_without_auth_notice(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_DEDUP_LOGS_ALLOW_REGEX")}
    env["HOME"] = str(tmp_path)   # no saved token: Ray generates one and would say so twice
    out = subprocess.run([sys.executable, "-c", _DRIVER], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert (tmp_path / ".ray" / "auth_token").is_file()    # token auth stayed on
    assert "Token authentication" not in text and "authentication token" not in text, text
    for model in ("T1-m0", "T1-m1", "T1-m2"):
        assert re.search(rf"INFO snp_ray\.market\.training: {model}-vgg11-w0\.25 epoch 1/12", text), text
    assert "repeated" not in text, text
