"""PackConfig: the knobs of packing a class set from fragments."""
from __future__ import annotations

from dataclasses import dataclass

from snp_ray.config import Config, added_field, check_range
from snp_ray.errors import ConfigError

SHARED = ("merge", "best")
RECON = ("mean", "sum")
PRECISIONS = ("auto", "fp32", "bf16")
BALANCE = ("none", "class")


@dataclass
class PackConfig(Config):
    delta: float = 1.0           # weight of the decoders' reconstruction term
    hidden: int = 256            # width of Enc
    epochs: int = 200            # passes over the cached few-shot features
    lr: float = 1e-3             # Adam (0 freezes Enc, decoders and head: a control, not a pack)
    weight_decay: float = 1e-4
    batch_size: int = 256
    augment_views: int = 8       # [ours] cached augmented views per image (1 = none)
    shared: str = "merge"        # two fragments of one class: both feed it, or keep the best
    recon: str = "mean"          # [ours] reconstruction per sample: mean over the fragment's dims
                                 # (one delta for any width), or "sum" = the notes' ||.||^2
    precision: str = "auto"      # [ours] training arithmetic: fp32, bf16 (autocast), auto = bf16 where native
    seed: int = 0
    # [ours] fragments of one source model share their lookup tables (packing/shared.py):
    # exact, only the pack's size changes; False keeps one table per fragment
    share_tables: bool = added_field(True)
    # [ours] "class": every class weighs the same in the cross-entropy, whatever its number of
    # samples (a requester's data is rarely balanced); "none": every sample weighs the same
    balance: str = added_field("none")

    def validate(self) -> None:
        n = "PackConfig"
        check_range(n, "delta", self.delta, 0.0, 1000.0)
        check_range(n, "hidden", self.hidden, 1, 65_536)
        check_range(n, "epochs", self.epochs, 1, 100_000)
        check_range(n, "lr", self.lr, 0.0, 1.0)
        check_range(n, "weight_decay", self.weight_decay, 0.0, 1.0)
        check_range(n, "batch_size", self.batch_size, 1, 1 << 20)
        check_range(n, "augment_views", self.augment_views, 1, 256)
        if self.shared not in SHARED:
            raise ConfigError(f"PackConfig.shared must be one of {SHARED}, got {self.shared!r}")
        if self.recon not in RECON:
            raise ConfigError(f"PackConfig.recon must be one of {RECON}, got {self.recon!r}")
        if self.balance not in BALANCE:
            raise ConfigError(f"PackConfig.balance must be one of {BALANCE}, got {self.balance!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"PackConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")


def preset_pack_config(preset: str, **overrides) -> PackConfig:
    """The packing settings that go with a slice preset: the defaults, then what a saved (tuned)
    preset carries (δ, lr, ...), then ``overrides``."""
    from snp_ray.slicing.config import pack_overrides   # slicing imports packing lazily too

    return PackConfig.from_dict({**PackConfig().to_dict(), **pack_overrides(preset), **overrides})
