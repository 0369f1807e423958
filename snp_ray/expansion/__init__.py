"""Expansion: how many usable class combinations a market's fragments can serve (Figure 6):
the estimate, its outputs and figure. The job that packs and tests the combinations is
:mod:`snp_ray.engine.expansion`."""
from snp_ray.expansion.estimate import ExpansionConfig, rates, wilson, write_outputs

__all__ = ["ExpansionConfig", "rates", "wilson", "write_outputs"]
