"""Expansion: how many usable class combinations a market's fragments can serve (Figure 6)."""
from snp_ray.expansion.estimate import ExpansionConfig, rates, run_expansion, wilson, write_outputs

__all__ = ["ExpansionConfig", "rates", "run_expansion", "wilson", "write_outputs"]
