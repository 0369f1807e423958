"""Input specs: how raw samples become the tensor a model expects.

A spec travels with every model and every fragment, so a pack may mix fragments with different
normalisation statistics or vocabularies: each one encodes the raw input itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from snp_ray.config import Config, added_field
from snp_ray.data.text import PAD, UNK, encode_texts
from snp_ray.errors import ConfigError, DataError
from snp_ray.data.tables import IMAGE_SHAPE


@dataclass
class InputSpec(Config):
    kind: str = ""

    def encode(self, raw: object, strict: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def example(self, batch: int = 2) -> torch.Tensor:
        raise NotImplementedError

    def compatible_with(self, other: "InputSpec") -> bool:
        return self.kind == other.kind

    @staticmethod
    def from_any(data: dict) -> "InputSpec":
        kind = data.get("kind") if isinstance(data, dict) else None
        cls = {"image": ImageSpec, "text": TextSpec}.get(kind)  # type: ignore[arg-type]
        if cls is None:
            raise ConfigError(f"input spec kind must be 'image' or 'text', got {kind!r}")
        return cls.from_dict(data)


@dataclass
class ImageSpec(InputSpec):
    """Per-channel mean/std on the 0..1 scale, computed from the model's own training data, and
    the (height, width) the model takes; other sizes are resized to it when encoded, so a pack can
    hold fragments of models trained at different resolutions."""

    kind: str = "image"
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    size: list[int] = field(default_factory=lambda: list(IMAGE_SHAPE[:2]))

    def validate(self) -> None:
        if self.kind != "image" or len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("ImageSpec needs kind='image' and 3 means and 3 stds")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"ImageSpec.std must be positive, got {self.std}")
        if len(self.size) != 2 or any(not 1 <= int(s) <= 4096 for s in self.size):
            raise ConfigError(f"ImageSpec.size must be [height, width] in 1..4096, got {self.size}")

    @classmethod
    def fit(cls, images: np.ndarray) -> "ImageSpec":
        x = images.reshape(-1, 3).astype(np.float64) / 255.0
        return cls(mean=x.mean(0).round(6).tolist(), std=np.maximum(x.std(0), 1e-3).round(6).tolist(),
                   size=[int(images.shape[1]), int(images.shape[2])])

    def example(self, batch: int = 2) -> torch.Tensor:
        """An encoded input of the model's shape (for tracing)."""
        return torch.zeros(batch, 3, *self.size)

    def encode(self, raw: object, strict: bool = False) -> torch.Tensor:
        """(N,H,W,3) uint8 array or tensor -> normalised float (N,3,*size), NCHW-contiguous."""
        x = torch.as_tensor(np.asarray(raw)) if not isinstance(raw, torch.Tensor) else raw
        if x.dim() != 4 or x.shape[3] != 3 or min(x.shape[1:3]) < 1:
            raise DataError(f"images must have shape (N, height, width, 3), got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if list(x.shape[2:]) != list(self.size):
            x = torch.nn.functional.interpolate(x, size=tuple(self.size), mode="bilinear",
                                                align_corners=False, antialias=False)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()

    def compatible_with(self, other: InputSpec) -> bool:
        return isinstance(other, ImageSpec)


@dataclass
class TextSpec(InputSpec):
    """The model's own vocabulary (index = token id) and its sequence length; ``table``: the
    sha256 of the static embedding table the model reads (its vocabulary is the table's; see
    :mod:`snp_ray.data.embeddings`), "" for a model that learnt its own embedding."""

    kind: str = "text"
    vocab: list[str] = field(default_factory=lambda: [PAD, UNK])
    max_len: int = 64
    table: str = added_field("")

    def validate(self) -> None:
        if self.kind != "text" or len(self.vocab) < 2 or self.vocab[:2] != [PAD, UNK]:
            raise ConfigError(f"TextSpec needs kind='text' and a vocabulary starting {[PAD, UNK]}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ConfigError("TextSpec.vocab holds duplicate tokens")
        if not 1 <= self.max_len <= 4096:
            raise ConfigError(f"TextSpec.max_len must be in [1, 4096], got {self.max_len}")
        if self.table and not (len(self.table) == 64 and set(self.table) <= set("0123456789abcdef")):
            raise ConfigError(f"TextSpec.table names a table by its sha256, got {self.table!r}")
        self._index = {tok: i for i, tok in enumerate(self.vocab)}

    def to_dict(self) -> dict:
        """Without ``table`` when there is none: a stored spec (and the identity of its model)
        stays what it was before static tables existed."""
        out = super().to_dict()
        if not out["table"]:
            del out["table"]
        return out

    def example(self, batch: int = 2) -> torch.Tensor:
        return torch.ones(batch, self.max_len, dtype=torch.long)

    def encode(self, raw: object, strict: bool = False) -> torch.Tensor:
        if isinstance(raw, str) or not all(isinstance(t, str) for t in raw):  # type: ignore[union-attr]
            raise DataError("text input must be a list of strings")
        return encode_texts(list(raw), self.vocab, self.max_len, strict, self._index)  # type: ignore[arg-type]

    def compatible_with(self, other: InputSpec) -> bool:
        return isinstance(other, TextSpec)
