"""Mutation check of the learning canaries: break one mechanism at a time in a temporary copy of
the repo and check that its canary test goes red. ``python benchmarks/canary_breaks.py [i ...]``
(no argument: all); prints RED or GREEN per break. Needs no data; about 30 s per break."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1])
BREAKS = [
 ("adaption optimiser step is a no-op", "snp_ray/slicing/slicer.py",
  "            loss.backward()\n            opt.step()\n        for g in train:", "            loss.backward()\n            opt.zero_grad()\n        for g in train:",
  "tests/test_learning.py::test_slicing_learns_a_class_detector_and_needs_a_trained_model"),
 ("l2,1 penalty sign flipped", "snp_ray/slicing/slicer.py",
  "loss = loss + cfg.alpha * l21", "loss = loss - cfg.alpha * l21",
  "tests/test_learning.py::test_ability_pooling_sparsifies_only_with_alpha"),
 ("l2,1 penalty dead (times 0)", "snp_ray/slicing/slicer.py",
  "loss = loss + cfg.alpha * l21", "loss = loss + 0.0 * l21",
  "tests/test_learning.py::test_ability_pooling_sparsifies_only_with_alpha"),
 ("consistency (l_dis) term sign flipped", "snp_ray/slicing/slicer.py",
  "loss = loss + cfg.gamma * (bar - target).pow(2).sum(1).mean()", "loss = loss - cfg.gamma * (bar - target).pow(2).sum(1).mean()",
  "tests/test_learning.py::test_consistency_term_keeps_the_f_bar_network_close_to_the_original"),
 ("f- takes dropped units from the fine-tuned weights", "snp_ray/slicing/slicer.py",
  "out[t.name] = torch.where(mask.view(shape), ft[t.name], full)", "out[t.name] = ft[t.name]",
  "tests/test_learning.py::test_f_bar_takes_dropped_units_from_the_original_weights"),
 ("fusion ignores the repairs", "snp_ray/slicing/slicer.py",
  "        shrink(features, self.graph, kept, repairs)", "        shrink(features, self.graph, kept, {})",
  "tests/test_learning.py::test_repairs_change_the_fused_fragment"),
 ("packing optimiser step is a no-op", "snp_ray/packing/packer.py",
  "                loss.backward()\n                opt.step()", "                loss.backward()\n                opt.zero_grad()",
  "tests/test_learning.py::test_packing_learns_and_a_frozen_pack_does_not"),
 ("packing CE sign flipped", "snp_ray/packing/packer.py",
  "loss = (ce * m * weight[idx]).sum() / len(idx)", "loss = -(ce * m * weight[idx]).sum() / len(idx)",
  "tests/test_learning.py::test_packing_learns_and_a_frozen_pack_does_not"),
 ("every decoder ends in ReLU again", "snp_ray/packing/packer.py",
  "out = torch.where(nonneg, torch.relu(out), out)", "out = torch.relu(out)",
  "tests/test_learning.py::test_decoders_reconstruct_signed_features"),
 ("GRU scored on the last state only (score gate off)", "snp_ray/slicing/graph.py",
  "scores = {g for g, _, _ in gate_layouts[gname] if scored_at.get(g, gname) == gname}", "scores = {g for g, _, _ in gate_layouts[gname] if gname not in score_only.values()}",
  "tests/test_slicing.py::test_recurrent_units_are_scored_on_every_time_step"),
]
only = sys.argv[1:]
missed = 0
for i, (what, path, old, new, test) in enumerate(BREAKS):
    if only and str(i) not in only:
        continue
    dst = os.path.join(tempfile.mkdtemp(prefix="snp-canary-"), "repo")
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", ".pytest_cache", "results"))
    f = os.path.join(dst, path)
    text = open(f).read()
    assert text.count(old) == 1, (what, text.count(old))
    open(f, "w").write(text.replace(old, new))
    env = dict(os.environ, PYTHONPATH=dst)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                       cwd=dst, env=env, capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("E ")][:3]
    missed += r.returncode == 0
    print(f"[{'RED' if r.returncode else 'GREEN (canary missed it!)'}] {i}: {what} -> {test}")
    for line in lines:
        print("     ", line[:200])
    sys.stdout.flush()
    shutil.rmtree(os.path.dirname(dst), ignore_errors=True)
sys.exit(1 if missed else 0)
