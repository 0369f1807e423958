"""SliceConfig: every knob of one slicing run, with the ``paper`` and ``quick`` presets.

The paper gives no values. Defaults start from NetGraft-like settings (Adam, lr 2.5e-4 for
layers, 2.5e-3 for repairs and the binary head) and are documented in docs/SLICING.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from snp_ray.config import Config, check_range
from snp_ray.errors import ConfigError, UnknownNameError

MODES = ("threshold", "rate")
L21_REDUCE = ("sum", "mean")
REPAIR_INIT = ("lstsq", "zeros")
COMBINE_TRAIN = ("current", "all")


@dataclass
class SliceConfig(Config):
    alpha: float = 1e-3            # weight of the l2,1 pooling penalty on D_c
    beta: float = 0.6              # threshold: keep s/max(s) > 1 - beta; rate: keep ceil(beta*u)
    gamma: float = 1.0             # weight of the output-consistency term in adaption/combining
    mode: str = "threshold"
    lr_layer: float = 2.5e-4       # Adam lr of the sliced layer's own weights
    lr_repair: float = 2.5e-3      # Adam lr of repairs and the binary head
    pool_epochs: int = 30          # ability pooling, per layer
    adapt_epochs: int = 30         # ability adaption, per layer
    combine_epochs: int = 30       # combining, per layer
    batch_size: int = 128
    augment: bool = True           # random crop + flip of the few-shot images at every step
    l21_reduce: str = "sum"        # [ours] "sum" over units as in the notes; "mean" divides by u
    repair_init: str = "lstsq"     # [ours] least-squares start for the repair; "zeros" = none
    combine_train: str = "current"  # [ours] combining step i trains layer i; "all": layers 1..i
    min_units: int = 1             # never keep fewer units than this in a layer
    seed: int = 0

    def validate(self) -> None:
        n = "SliceConfig"
        check_range(n, "alpha", self.alpha, 0.0, 10.0)
        check_range(n, "beta", self.beta, 0.0, 1.0, lo_open=True)
        check_range(n, "gamma", self.gamma, 0.0, 1000.0)
        check_range(n, "lr_layer", self.lr_layer, 0.0, 1.0)
        check_range(n, "lr_repair", self.lr_repair, 0.0, 1.0)
        for e in ("pool_epochs", "adapt_epochs", "combine_epochs"):
            check_range(n, e, getattr(self, e), 0, 100_000)
        check_range(n, "batch_size", self.batch_size, 1, 65_536)
        check_range(n, "min_units", self.min_units, 1, 1_000_000)
        for name, value, valid in (("mode", self.mode, MODES), ("l21_reduce", self.l21_reduce, L21_REDUCE),
                                   ("repair_init", self.repair_init, REPAIR_INIT),
                                   ("combine_train", self.combine_train, COMBINE_TRAIN)):
            if value not in valid:
                raise ConfigError(f"SliceConfig.{name} must be one of {valid}, got {value!r}")


PRESETS: dict[str, SliceConfig] = {
    "paper": SliceConfig(),
    "quick": SliceConfig(pool_epochs=8, adapt_epochs=8, combine_epochs=8),
    "smoke": SliceConfig(pool_epochs=1, adapt_epochs=1, combine_epochs=1),   # plumbing tests only
}


def slice_preset(name: str, **overrides) -> SliceConfig:
    try:
        base = PRESETS[name]
    except KeyError:
        raise UnknownNameError("slice preset", name, list(PRESETS)) from None
    return SliceConfig.from_dict({**base.to_dict(), **overrides})
