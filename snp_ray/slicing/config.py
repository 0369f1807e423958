"""SliceConfig: every knob of one slicing run, with the ``paper`` and ``quick`` presets.

The paper gives no values. Defaults start from NetGraft-like settings (Adam, lr 2.5e-4 for
layers, 2.5e-3 for repairs and the binary head) and are documented in docs/SLICING.md.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snp_ray.config import Config, added_field, check_range, runtime_field
from snp_ray.errors import ConfigError, UnknownNameError

MODES = ("threshold", "rate")
L21_REDUCE = ("sum", "mean")
REPAIR_INIT = ("ridge", "lstsq", "zeros")
COMBINE_TRAIN = ("current", "all")
LAYERNORM = ("keep", "repair")
PRECISIONS = ("auto", "fp32", "bf16")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


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
    augment: bool = True           # random crop + flip of the few-shot images
    views: int = 4                 # [ours] augmented copies of D drawn once per model; 0: fresh every step
    precision: str = "auto"        # [ours] training arithmetic: fp32, bf16 (autocast), auto = bf16 where fast
    l21_reduce: str = "sum"        # [ours] "sum" over units as in the notes; "mean" divides by u
    # [ours] start of the repair: "ridge" = ridge regression of dropped on kept activations over D,
    # its strength chosen by cross-validation over the few-shot samples (0 = no repair is a
    # candidate); "lstsq" = the unregularised least-squares fit (before #13: it interpolates, and
    # explodes, where a layer has fewer activation rows than kept units); "zeros" = none
    repair_init: str = "ridge"
    combine_train: str = "current"  # [ours] combining step i trains layer i; "all": layers 1..i
    min_units: int = 1             # never keep fewer units than this in a layer
    seed: int = 0
    # [ours] batched engine: classes per pass, a memory cap; never in the digest (runtime_field)
    class_batch: int = runtime_field(16)
    # [ours] lookup tables (embeddings: layers that read token ids) are selected but never
    # trained, so every fragment of a model keeps the source's values in its kept columns and a
    # pack stores one table per source model (packing/shared.py); False: trained like any layer
    freeze_tables: bool = added_field(False)
    # [ours] > 0: keep the top ceil(table_rate * u) columns of every lookup table (rate selection,
    # whatever ``mode`` says for the other layers); 0: tables are selected like any layer
    table_rate: float = added_field(0.0)
    # [ours] > 0: keep the top ceil(depthwise_rate * u) units of every group coupled to a
    # depthwise convolution (the expanded units of inverted residuals; 1.0 keeps them whole);
    # 0: selected like any layer. Dropped expanded units of MobileNetV2 are what cost its
    # fragments' AUC (docs/RESULTS.md, the mixed market's diagnosis)
    depthwise_rate: float = added_field(0.0)
    # [ours] > 0: keep the top ceil(coupled_rate * u) units of every group that several mixing
    # layers write (a residual stage: its stem or shortcut and every block's last conv share one
    # kept set); 0: selected like any layer. Threshold selection keeps most of these shared units
    # in ResNet-20, and they decide most of a fragment's size (issue #17, section 3)
    coupled_rate: float = added_field(0.0)
    # [ours] units a LayerNorm normalises (a Transformer's residual stream): "keep" keeps them
    # whole; "repair" slices them too. Each such LayerNorm then reads its dropped inputs rebuilt
    # through the group's repair, and its fused form (surgery.RepairedLayerNorm) carries that
    # repair to take the same statistics from the kept inputs (docs/SLICING.md)
    layernorm: str = added_field("keep")

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
        check_range(n, "views", self.views, 0, 1024)
        check_range(n, "min_units", self.min_units, 1, 1_000_000)
        check_range(n, "class_batch", self.class_batch, 1, 100_000)
        check_range(n, "table_rate", self.table_rate, 0.0, 1.0)
        check_range(n, "depthwise_rate", self.depthwise_rate, 0.0, 1.0)
        check_range(n, "coupled_rate", self.coupled_rate, 0.0, 1.0)
        for name, value, valid in (("mode", self.mode, MODES), ("l21_reduce", self.l21_reduce, L21_REDUCE),
                                   ("repair_init", self.repair_init, REPAIR_INIT),
                                   ("combine_train", self.combine_train, COMBINE_TRAIN),
                                   ("precision", self.precision, PRECISIONS),
                                   ("layernorm", self.layernorm, LAYERNORM)):
            if value not in valid:
                raise ConfigError(f"SliceConfig.{name} must be one of {valid}, got {value!r}")


PRESETS: dict[str, SliceConfig] = {
    "paper": SliceConfig(),
    "quick": SliceConfig(pool_epochs=8, adapt_epochs=8, combine_epochs=8),
    # half of quick's epochs: what a 200-pair market (market50) can afford on a shared 2-core VM
    "fast": SliceConfig(pool_epochs=4, adapt_epochs=4, combine_epochs=4),
    "smoke": SliceConfig(pool_epochs=1, adapt_epochs=1, combine_epochs=1),   # plumbing tests only
    # quick with the units LayerNorms normalise sliced too (a Transformer's residual stream)
    "quick-ln": SliceConfig(pool_epochs=8, adapt_epochs=8, combine_epochs=8, layernorm="repair"),
}


_VARIANT_MODE = re.compile(r"^(threshold|rate)([0-9.]*)$")
_VARIANT_TABLE = re.compile(r"^table([0-9.]+)$")


def variant_overrides(variant: str) -> dict[str, Any]:
    """A slice variant written as text, as the text-pack study names them:
    ``rate0.5+frozen+table0.25`` -> mode rate, beta 0.5, freeze_tables, table_rate 0.25;
    ``threshold`` alone keeps the preset's beta. ConfigError on anything else."""
    head, *opts = variant.split("+")
    m = _VARIANT_MODE.match(head)
    if not m:
        raise ConfigError(f"bad slice variant {variant!r}: threshold|rate[<beta>][+frozen][+table<rate>]")
    out: dict[str, Any] = {"mode": m.group(1)}
    try:
        if m.group(2) or m.group(1) == "rate":
            out["beta"] = float(m.group(2) or 0.5)
        for opt in opts:
            t = _VARIANT_TABLE.match(opt)
            if opt == "frozen":
                out["freeze_tables"] = True
            elif t:
                out["table_rate"] = float(t.group(1))
            else:
                raise ConfigError(f"bad option {opt!r} in slice variant {variant!r}")
    except ValueError:
        raise ConfigError(f"bad number in slice variant {variant!r}") from None
    return out


#: where named presets saved by a Tune sweep live (``SNP_PRESETS`` overrides)
ENV_PRESETS = "SNP_PRESETS"
DEFAULT_PRESET_DIR = "runs/presets"


def preset_dir() -> Path:
    return Path(os.environ.get(ENV_PRESETS) or DEFAULT_PRESET_DIR)


def _preset_file(name: str) -> Path | None:
    """A saved preset: a path to a preset JSON file, or a name under :func:`preset_dir`."""
    if name.endswith(".json"):
        return Path(name)
    if not _NAME.fullmatch(name):
        return None
    return preset_dir() / f"{name}.json"


def saved_presets() -> list[str]:
    folder = preset_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_preset(name: str) -> dict[str, Any]:
    """The saved preset ``name`` as ``{"name", "slice": {...}, "pack": {...}, "source": {...}}``."""
    path = _preset_file(name)
    if path is None or not path.is_file():
        raise UnknownNameError("slice preset", name, list(PRESETS) + saved_presets())
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"preset file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("slice"), dict):
        raise ConfigError(f"preset file {path} has no 'slice' object")
    SliceConfig.from_dict(data["slice"])            # validates; typed error on bad values
    return data


def slice_preset(name: str, **overrides) -> SliceConfig:
    """A built-in preset (paper, quick, smoke) or one a Tune sweep saved (a name or a .json path)."""
    base = PRESETS[name].to_dict() if name in PRESETS else load_preset(name)["slice"]
    return SliceConfig.from_dict({**base, **overrides})


def pack_overrides(name: str) -> dict[str, Any]:
    """The packing settings a saved preset carries (δ, learning rate, epochs); {} for built-ins."""
    if name in PRESETS:
        return {}
    pack = load_preset(name).get("pack") or {}
    if not isinstance(pack, dict):
        raise ConfigError(f"preset {name!r}: 'pack' must be an object, got {type(pack).__name__}")
    return dict(pack)


def check_preset_name(name: str) -> None:
    """A name a preset can be saved under: not built-in, safe as a file name, not a path."""
    if (not isinstance(name, str) or name in PRESETS or not _NAME.fullmatch(name)
            or name.endswith(".json")):
        raise ConfigError(f"cannot save a preset named {name!r}: use letters, digits, '-', '_', "
                          f"'.' (not ending in .json), and not a built-in name {sorted(PRESETS)}")


def save_preset(name: str, slice_cfg: SliceConfig, pack: dict[str, Any] | None = None,
                source: dict[str, Any] | None = None) -> Path:
    """Save a named preset atomically; built-in names cannot be replaced."""
    from snp_ray.artifacts import atomic_write_bytes

    check_preset_name(name)
    path = preset_dir() / f"{name}.json"
    body = {"name": name, "slice": slice_cfg.to_dict(), "pack": dict(pack or {}),
            "source": dict(source or {})}
    atomic_write_bytes(path, json.dumps(body, indent=1, sort_keys=True).encode())
    return path
