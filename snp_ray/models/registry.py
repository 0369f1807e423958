"""Architecture registry: the one place that maps a name to a builder.

Everything else (market, slicing, CLI) asks the registry, so adding an architecture means adding
one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from snp_ray.errors import ConfigError, UnknownNameError
from snp_ray.models.base import Classifier, count_params
from snp_ray.models.convnet import CONFIGS as CONVNETS, convnet
from snp_ray.models.resnet import LAYOUTS, resnet
from snp_ray.models.rnn import rnn
from snp_ray.models.static import rnn_static, textcnn_static
from snp_ray.models.textcnn import textcnn
from snp_ray.models.vgg import CONFIGS, vgg
from snp_ray.models.vit import transformer, vit


@dataclass(frozen=True)
class Arch:
    name: str
    family: str        # vgg | resnet | convnet | vit | textcnn | rnn | transformer
    modality: str      # image | text
    builder: Callable[..., Classifier]
    #: reads a frozen, shared word-embedding table given at build time (not its own parameter)
    static_table: bool = False


ARCHS: dict[str, Arch] = {}
for _name in CONFIGS:
    ARCHS[_name] = Arch(_name, "vgg", "image", partial(vgg, _name))
for _name in LAYOUTS:
    ARCHS[_name] = Arch(_name, "resnet", "image", partial(resnet, _name))
for _name in CONVNETS:
    ARCHS[_name] = Arch(_name, "convnet", "image", partial(convnet, _name))
ARCHS["textcnn"] = Arch("textcnn", "textcnn", "text", textcnn)
ARCHS["gru"] = Arch("gru", "rnn", "text", partial(rnn, cell="gru"))
ARCHS["lstm"] = Arch("lstm", "rnn", "text", partial(rnn, cell="lstm"))
ARCHS["vit"] = Arch("vit", "vit", "image", vit)
ARCHS["transformer"] = Arch("transformer", "transformer", "text", transformer)
# the paper's Table 3 models: a static 300-d word2vec table per task (snp_ray.data.embeddings)
ARCHS["textcnn_static"] = Arch("textcnn_static", "textcnn", "text", textcnn_static, static_table=True)
ARCHS["gru_static"] = Arch("gru_static", "rnn", "text", partial(rnn_static, cell="gru"),
                           static_table=True)

#: vocabulary size used to report text-model sizes when no real vocabulary is at hand
REFERENCE_VOCAB = 10_000
#: width of the static tables (Kim 2014's word2vec vectors)
STATIC_DIM = 300


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise UnknownNameError("architecture", name, list(ARCHS)) from None


def build_model(arch: str, num_classes: int, width: float = 1.0,
                vocab_size: int | None = None, table: str | torch.Tensor | None = None) -> Classifier:
    """Build an untrained model. Text models need ``vocab_size`` (their own vocabulary's);
    a static-table model (``Arch.static_table``) needs ``table`` too: the sha256 of a stored
    table (:mod:`snp_ray.data.embeddings`) or the vectors themselves."""
    a = get_arch(arch)
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not (0 < float(width) <= 8):
        raise ConfigError(f"width multiplier must be in (0, 8], got {width!r}")
    if a.modality == "text":
        if not vocab_size or vocab_size < 2:
            raise ConfigError(f"text architecture {arch!r} needs vocab_size >= 2, got {vocab_size!r}")
        if a.static_table:
            if table is None or (isinstance(table, str) and not table):
                raise ConfigError(f"architecture {arch!r} reads a static embedding table: give "
                                  "its sha256 (the model's input spec names it)")
            return a.builder(num_classes=num_classes, vocab_size=int(vocab_size),
                             width=float(width), table=table)
        if table is not None and not (isinstance(table, str) and not table):
            raise ConfigError(f"architecture {arch!r} learns its own embedding; it takes no "
                              "static table")
        return a.builder(num_classes=num_classes, vocab_size=int(vocab_size), width=float(width))
    return a.builder(num_classes=num_classes, width=float(width))


def param_table(num_classes: int = 10, width: float = 1.0) -> dict[str, int]:
    """Parameter count of every architecture (text models at ``REFERENCE_VOCAB`` tokens; a
    static table is not counted, so its size does not matter: a zero one stands in)."""
    table = torch.zeros(REFERENCE_VOCAB, STATIC_DIM)
    return {name: count_params(build_model(name, num_classes, width, REFERENCE_VOCAB,
                                           table if ARCHS[name].static_table else None))
            for name in ARCHS}
