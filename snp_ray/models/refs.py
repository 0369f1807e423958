"""Architecture references: one resolver for the zoo and for outside model libraries.

A reference is ``<source>:<name>[?key=value&key=value]``:

* ``snp:<zoo name>`` (or a bare zoo name, as older specs store it), e.g. ``snp:vgg11?width=0.25``;
* ``torchvision:<name>``, built with ``torchvision.models.get_model(name, weights=None, ...)``,
  e.g. ``torchvision:mobilenet_v2?width_mult=0.5``;
* ``timm:<name>``, built with ``timm.create_model(name, pretrained=False, ...)``.

Values are parsed as int, float, bool (true/false) or else kept as strings. Nothing is ever
downloaded: outside models are built without pretrained weights. An outside model becomes a
:class:`Classifier` by tracing (:func:`split_classifier`), which needs an example input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl

import torch

from snp_ray.errors import ConfigError, SnpError, UnknownNameError
from snp_ray.models.base import Classifier
from snp_ray.models.external import split_classifier
from snp_ray.models.registry import ARCHS, build_model

SOURCES = ("snp", "torchvision", "timm")


@dataclass(frozen=True)
class ArchRef:
    source: str                     # snp | torchvision | timm
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def external(self) -> bool:
        return self.source != "snp"

    def __str__(self) -> str:
        query = "&".join(f"{k}={_fmt(v)}" for k, v in sorted(self.kwargs.items()))
        return f"{self.source}:{self.name}" + (f"?{query}" if query else "")


def _fmt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_ref(ref: str) -> ArchRef:
    """Parse an architecture reference; a bare name is a zoo name (``snp:``)."""
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"architecture reference must be a non-empty string, got {ref!r}")
    ref = ref.strip()
    source, sep, rest = ref.partition(":")
    if not sep:
        source, rest = "snp", ref
    if source not in SOURCES:
        raise UnknownNameError("architecture source", source, list(SOURCES))
    name, _, query = rest.partition("?")
    if not name:
        raise ConfigError(f"architecture reference {ref!r} names no model")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(f"architecture reference {ref!r}: options must be key=value&key=value") from None
    kwargs = {k: _value(v) for k, v in pairs}
    for banned in ("weights", "pretrained", "num_classes", "pretrained_cfg", "checkpoint_path"):
        if banned in kwargs:
            raise ConfigError(f"architecture reference {ref!r}: {banned!r} is set by snp_ray "
                              "(models are built without downloaded weights; the head size comes "
                              "from the classes)")
    if source != "snp":
        extra = sorted(set(kwargs) - EXTERNAL_OPTIONS)
        if extra:
            raise ConfigError(f"architecture reference {ref!r}: options {extra} are not taken; "
                              f"an outside model takes {sorted(EXTERNAL_OPTIONS)} (its size is "
                              "the library's, so an upload cannot make the server allocate more)")
    if "img_size" in kwargs or "patch_size" in kwargs:
        _check_tokens(ref, kwargs)
    if source == "snp":
        if name not in ARCHS:
            raise UnknownNameError("architecture", name, list(ARCHS))
        extra = sorted(set(kwargs) - {"width"})
        if extra:
            raise ConfigError(f"zoo architecture {name!r} takes only a width option, got {extra}")
    return ArchRef(source, name, kwargs)


#: the only constructor options an outside reference may set: regularisation and width knobs
#: that do not let a reference grow the model past its family (``embed_dim=65536&depth=200``)
EXTERNAL_OPTIONS = frozenset({"width_mult", "dropout", "drop_rate", "drop_path_rate",
                              "attention_dropout", "stochastic_depth_prob", "global_pool",
                              "img_size", "patch_size"})
#: a ViT's input and patch sizes set its token count, and attention costs tokens squared: a
#: reference may fit a ViT to small images (``img_size=32&patch_size=4``: 64 tokens) but not ask
#: for more tokens than a 224-pixel ViT with 16-pixel patches has (196)
MAX_TOKENS = 256


def _check_tokens(ref: str, kwargs: dict[str, Any]) -> None:
    img, patch = kwargs.get("img_size", 224), kwargs.get("patch_size", 16)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024
               for v in (img, patch)):
        raise ConfigError(f"architecture reference {ref!r}: img_size and patch_size must be "
                          "integers in 1..1024")
    if (img // patch) ** 2 > MAX_TOKENS:
        raise ConfigError(f"architecture reference {ref!r}: {img}-pixel images in {patch}-pixel "
                          f"patches make {(img // patch) ** 2} tokens, more than the "
                          f"{MAX_TOKENS} a market takes")
#: the most parameters an outside model may have; counted on the meta device, before any memory
MAX_PARAMS = 200_000_000


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def build_external(ref: ArchRef, num_classes: int, max_params: int = MAX_PARAMS) -> torch.nn.Module:
    """The outside library's model with ``num_classes`` outputs and fresh (random) weights,
    refused before allocation when it has more than ``max_params`` parameters."""
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if ref.source == "torchvision":
        import torchvision

        names = _torchvision_names()
        if ref.name not in names:
            raise UnknownNameError("torchvision model", ref.name, names)
        build = lambda: torchvision.models.get_model(ref.name, weights=None,  # noqa: E731
                                                     num_classes=num_classes, **ref.kwargs)
    elif ref.source == "timm":
        try:
            import timm
        except ImportError:
            raise ConfigError("timm: references need the timm package (pip install timm)") from None
        names = timm.list_models()
        if ref.name not in names:
            raise UnknownNameError("timm model", ref.name, names)
        build = lambda: timm.create_model(ref.name, pretrained=False,  # noqa: E731
                                          num_classes=num_classes, **ref.kwargs)
    else:
        raise ConfigError(f"{ref} is not an outside model")
    try:
        return build_capped(build, str(ref), max_params).eval()
    except SnpError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError,
            NotImplementedError) as e:
        raise ConfigError(f"cannot build {ref}: {e}") from None


def build_capped(build: Callable[[], torch.nn.Module], what: str,
                 max_params: int = MAX_PARAMS) -> torch.nn.Module:
    """``build()``, after building it once on the meta device (parameters without storage) and
    refusing it when it has more than ``max_params`` parameters: the size is known before any
    memory is taken."""
    with torch.device("meta"):
        params = sum(p.numel() for p in build().parameters())
    if params > max_params:
        raise ConfigError(f"{what} has {params:,} parameters, more than the {max_params:,} a "
                          "market takes")
    return build()


def ref_width(ref: ArchRef) -> float:
    return float(ref.kwargs.get("width", 1.0)) if not ref.external else 1.0


def build_arch(arch: str, num_classes: int, width: float = 1.0, vocab_size: int | None = None,
               example: torch.Tensor | None = None, table: str = "") -> Classifier:
    """Any architecture reference as an untrained :class:`Classifier` (features + head).

    Zoo names use ``width`` (and ``table``, the static embedding table a static-table text
    model reads); an outside model is traced on ``example`` (needed) to split its features from
    its final Linear head."""
    ref = parse_ref(arch)
    if not ref.external:
        w = float(ref.kwargs["width"]) if "width" in ref.kwargs else width
        return build_model(ref.name, num_classes, w, vocab_size=vocab_size, table=table or None)
    if example is None:
        raise ConfigError(f"{ref} needs an example input to find its head")
    model = build_external(ref, num_classes)
    try:
        return split_classifier(model, example)
    except SnpError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        raise ConfigError(f"{ref} cannot run on a {tuple(example.shape[1:])} input: {e}") from None


def is_external(arch: str) -> bool:
    return parse_ref(arch).external
