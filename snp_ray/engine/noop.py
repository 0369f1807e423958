"""The ``noop-benchmark`` slice mode: for ``benchmarks/driver_memory.py`` only.

In this mode an actor slices nothing and loads no model: it writes a tiny placeholder fragment
(an empty extractor and a probe sized to ``kb`` KiB of weights) so the benchmark measures the
job's scheduling, store writes and driver memory without the cost of slicing. The fragments are
kept apart from real ones: their keys end in ``-noop-benchmark`` (the spec's ``subset``), so a
real job or a pack request never finds them, and their metrics say ``noop_benchmark``.
"""
from __future__ import annotations

import time

from snp_ray.errors import ConfigError
from snp_ray.market.modelstore import ModelSpec
from snp_ray.slicing.api import pair_key
from snp_ray.slicing.config import SliceConfig

SLICE = "slice"
NOOP_BENCHMARK = "noop-benchmark"
SLICE_MODES = (SLICE, NOOP_BENCHMARK)


def check_mode(mode: str) -> str:
    if mode not in SLICE_MODES:
        raise ConfigError(f"unknown slice mode {mode!r}; valid: {', '.join(SLICE_MODES)}")
    return mode


def job_pair_key(spec: ModelSpec, class_id: int, config: SliceConfig, k: int, seed: int,
                 mode: str = SLICE) -> str:
    """The store key of a pair in ``mode``: the real pair key, suffixed in the benchmark mode."""
    key = pair_key(spec, class_id, config, k, seed)
    return f"{key}-{NOOP_BENCHMARK}" if check_mode(mode) == NOOP_BENCHMARK else key


def noop_fragment(spec: ModelSpec, class_id: int, config: SliceConfig, k: int, seed: int,
                  kb: int = 1):
    """A placeholder fragment of ``spec``'s class ``class_id`` with about ``kb`` KiB of weights."""
    from torch import nn

    from snp_ray.slicing.fragment import Fragment, FragmentSpec

    t0 = time.perf_counter()
    dim = max(1, int(kb) * 1024 // 8)             # a 2 x dim fp32 probe: 8 bytes per feature
    probe = nn.Linear(dim, 2)
    local = spec.classes.index(class_id)
    fspec = FragmentSpec(
        source_model=spec.id, source_sha256=spec.weights_sha256, source_identity=spec.identity,
        arch=spec.arch, width=spec.width,
        source_classes=len(spec.classes), class_id=int(class_id),
        class_name=spec.class_names[local], kept={}, group_names={}, group_sizes={},
        feature_dim=dim, params=sum(p.numel() for p in probe.parameters()),
        source_params=spec.params, flops=0, source_flops=0, input=spec.input,
        config=config.to_dict(), config_digest=config.digest(), k=int(k), fewshot_seed=int(seed),
        seconds=0.0, metrics={"noop_benchmark": 1.0}, subset=NOOP_BENCHMARK)
    frag = Fragment(fspec, nn.Sequential(), probe)
    frag.spec = frag.spec.replace(seconds=time.perf_counter() - t0)
    return frag
