"""NetGraft baseline (Shen et al., AAAI 2021, "Progressive Network Grafting for Few-Shot KD").

What the authors' code does for VGG16 on CIFAR: the student keeps the teacher's first blocks
(copied, not trained) and replaces the last two conv blocks (512 channels) by blocks of half the
width, and the classifier by a new one. Between blocks sit 1x1 "adapter" convs: t2s (teacher width
to student width) before a student block and s2t (student to teacher width) after it.
1. Block-wise grafting: each student unit (block plus its adapters; the last unit is t2s +
   classifier) replaces its teacher counterpart inside the frozen teacher and is trained, alone,
   to keep the teacher's logits: ``|| l2norm(logits_grafted) - l2norm(logits_teacher) ||^2``.
2. Net-wise grafting: units 0..1, then 0..2, ... are connected and trained together in the
   teacher the same way, until the student replaces all grafted teacher blocks.
Only unlabelled few-shot images are used. Optimiser Adam; block-wise lr for adapters 10x that
of the blocks; net-wise one small lr (values below are ours, scaled to short CPU runs).

Adaptation to the market (the S&P paper: "we utilize NetGraft to partition models and train a
classifier layer for the combining models"; Table 2 gives it the parameters of S&P (R)):
* every task model is grafted into its own thin student on that model's own k-shot set (all its
  classes, labels unused), and a linear head over the target classes is trained on the
  concatenated, frozen student features (few-shot samples of the target classes), exactly as
  the ensemble baseline does with the full extractors;
* the blocks: a VGG "block" is the conv layers up to and including a max-pool; the last
  ``graft_blocks`` blocks are grafted at ``width_ratio`` of the teacher's width (default: the
  last two at half width, as the authors' VGG16 student);
* deployable student = copied prefix + thin blocks, where each adapter pair s2t -> t2s between
  two student blocks is fused into one 1x1 conv (exact: no non-linearity between them);
* cached augmented views (crop + flip) stand in for per-epoch augmentation, and the teacher's
  frozen prefix runs once per view; the loss is averaged over the batch (the authors sum);
* no model selection on test accuracy (the authors' code keeps the best test epoch): the last
  epoch is kept;
* VGG only, as the authors' code (the paper has no ResNet NetGraft numbers either); text models
  are refused with a ConfigError.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from snp_ray.baselines.common import (BaselineResult, TaskData, as_config, batches, check_image,
                                      finite, image_views, load_task)
from snp_ray.baselines.ensemble import EnsembleConfig, concat_head
from snp_ray.config import Config, check_range
from snp_ray.data.specs import InputSpec
from snp_ray.errors import ConfigError, DataError
from snp_ray.market.market import Market
from snp_ray.models import Classifier, count_params
from snp_ray.models.vgg import scaled

log = logging.getLogger(__name__)


@dataclass
class NetGraftConfig(Config):
    width_ratio: float = 0.5     # student width / teacher width in the grafted blocks
    graft_blocks: int = 2        # grafted conv blocks, counted from the last (the head always is)
    block_epochs: int = 30       # block-wise stage, per unit (one cached view per pass)
    net_epochs: int = 30         # net-wise stage, per connection step
    block_lr: float = 1e-3       # Adam, student blocks and heads in the block-wise stage
    adapter_lr: float = 1e-2     # Adam, adapters in the block-wise stage
    net_lr: float = 5e-4         # Adam, everything in the net-wise stage
    batch_size: int = 64
    views: int = 8               # cached augmented views of each model's k-shot images
    head_epochs: int = 200       # the combining head over the students' features
    head_lr: float = 3e-3
    head_hidden: int = 0
    seed: int = 0

    def validate(self) -> None:
        n = "NetGraftConfig"
        check_range(n, "width_ratio", self.width_ratio, 0.0, 1.0, lo_open=True)
        check_range(n, "graft_blocks", self.graft_blocks, 1, 64)
        check_range(n, "block_epochs", self.block_epochs, 0, 100_000)
        check_range(n, "net_epochs", self.net_epochs, 0, 100_000)
        for f in ("block_lr", "adapter_lr", "net_lr", "head_lr"):
            check_range(n, f, getattr(self, f), 0.0, 1.0, lo_open=True)
        check_range(n, "batch_size", self.batch_size, 2, 1 << 20)
        check_range(n, "views", self.views, 1, 256)
        check_range(n, "head_epochs", self.head_epochs, 1, 100_000)
        check_range(n, "head_hidden", self.head_hidden, 0, 65_536)

    def head_config(self) -> EnsembleConfig:
        return EnsembleConfig(hidden=self.head_hidden, epochs=self.head_epochs, lr=self.head_lr,
                              views=self.views, seed=self.seed)


# ------------------------------------------------------------------------------ structure
def vgg_blocks(features: nn.Sequential) -> list[nn.Sequential]:
    """A VGG extractor cut after each max-pool (the trailing Flatten is dropped)."""
    blocks, cur = [], []
    for m in features:
        if isinstance(m, nn.Flatten):
            continue
        cur.append(m)
        if isinstance(m, nn.MaxPool2d):
            blocks.append(nn.Sequential(*cur))
            cur = []
    if cur or not blocks:
        raise ConfigError("not a VGG extractor: layers after the last max-pool")
    return blocks


def _out_channels(block: nn.Sequential) -> int:
    return [m for m in block if isinstance(m, nn.Conv2d)][-1].out_channels


def thin_block(block: nn.Sequential, c_in: int, ratio: float) -> nn.Sequential:
    """The block's layer pattern (conv-BN-ReLU ... max-pool) at ``ratio`` of its width, fresh."""
    layers: list[nn.Module] = []
    for m in block:
        if isinstance(m, nn.Conv2d):
            c_out = scaled(m.out_channels, ratio)
            layers.append(nn.Conv2d(c_in, c_out, m.kernel_size, m.stride, m.padding, bias=m.bias is not None))
            c_in = c_out
        elif isinstance(m, nn.BatchNorm2d):
            layers.append(nn.BatchNorm2d(c_in))
        else:
            layers.append(copy.deepcopy(m))
    return nn.Sequential(*layers)


def fuse_1x1(first: nn.Conv2d, second: nn.Conv2d) -> nn.Conv2d:
    """One 1x1 conv equal to ``second(first(x))``."""
    w1, w2 = first.weight[:, :, 0, 0], second.weight[:, :, 0, 0]
    fused = nn.Conv2d(first.in_channels, second.out_channels, 1)
    with torch.no_grad():
        fused.weight.copy_((w2 @ w1)[:, :, None, None])
        b1 = first.bias if first.bias is not None else torch.zeros(first.out_channels)
        b2 = second.bias if second.bias is not None else torch.zeros(second.out_channels)
        fused.bias.copy_(w2 @ b1 + b2)
    return fused


class Graft(nn.Module):
    """A teacher with its last ``g`` blocks and head graftable: unit j < g is block j of the
    grafted part, unit g is the head. ``forward(prefix_out, student_units)`` runs the listed units
    as student units (adapters included) and the others as the frozen teacher's."""

    def __init__(self, teacher: Classifier, g: int, ratio: float):
        super().__init__()
        blocks = vgg_blocks(teacher.features)
        if g >= len(blocks):
            raise ConfigError(f"graft_blocks={g} but the model has only {len(blocks)} blocks; "
                              f"at least one must stay as the prefix")
        self.g = g
        self.prefix = copy.deepcopy(nn.Sequential(*blocks[:-g]))
        self.t_units = nn.ModuleList([copy.deepcopy(b) for b in blocks[-g:]] + [copy.deepcopy(teacher.head)])
        for p in list(self.prefix.parameters()) + list(self.t_units.parameters()):
            p.requires_grad_(False)
        t_width = [_out_channels(b) for b in blocks]
        c_in = t_width[-g - 1]
        s_blocks, s_width = [], []
        for b in blocks[-g:]:
            s = thin_block(b, c_in, ratio)
            s_blocks.append(s)
            c_in = _out_channels(s)
            s_width.append(c_in)
        self.s_blocks = nn.ModuleList(s_blocks)
        tw = t_width[-g:]
        self.s2t = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(s_width, tw))
        self.t2s = nn.ModuleList(nn.Conv2d(t, s, 1) for s, t in zip(s_width, tw))
        self.s_head = nn.Linear(s_width[-1], teacher.head.out_features)
        self.feature_dim = s_width[-1]

    def unit_params(self, j: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(block/head parameters, adapter parameters) of student unit j."""
        main = list(self.s_head.parameters()) if j == self.g else list(self.s_blocks[j].parameters())
        adapters = (list(self.t2s[j - 1].parameters()) if j > 0 else []) + \
                   (list(self.s2t[j].parameters()) if j < self.g else [])
        return main, adapters

    def forward(self, h: torch.Tensor, student: set[int] = frozenset()) -> torch.Tensor:
        for j in range(self.g + 1):
            if j not in student:
                h = self.t_units[j](h.flatten(1) if j == self.g else h)
                continue
            if j > 0:
                h = self.t2s[j - 1](h)
            if j == self.g:
                h = self.s_head(h.flatten(1))
            else:
                h = self.s2t[j](self.s_blocks[j](h))
        return h

    def student(self) -> Classifier:
        """The deployable student: prefix + thin blocks with fused adapter pairs, its own head."""
        layers: list[nn.Module] = [copy.deepcopy(self.prefix)]
        for j in range(self.g):
            layers += [copy.deepcopy(self.s_blocks[j]), fuse_1x1(self.s2t[j], self.t2s[j])]
        layers.append(nn.Flatten())
        model = Classifier(nn.Sequential(*layers), self.feature_dim, self.s_head.out_features)
        model.head = copy.deepcopy(self.s_head)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    def student_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.s_blocks, self.s2t, self.t2s, self.s_head])


def graft_loss(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """NetGraft's normalised-logit loss, averaged over the batch."""
    return (F.normalize(z_s, dim=1) - F.normalize(z_t, dim=1)).pow(2).sum(1).mean()


@dataclass
class GraftOutcome:
    student: Classifier
    graft: Graft
    loss: float
    agreement: float
    seconds: float


def graft_model(teacher: Classifier, spec: InputSpec, raw, cfg: NetGraftConfig) -> GraftOutcome:
    """Graft one teacher into a thin student on its own (unlabelled) few-shot images."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    graft = Graft(teacher, cfg.graft_blocks, cfg.width_ratio)
    graft.prefix.eval()
    graft.t_units.eval()
    with torch.no_grad():
        h0 = [graft.prefix(spec.encode(v)) for v in image_views(raw, cfg.views, cfg.seed + 1)]
        zt = [graft(h) for h in h0]
    gen = torch.Generator().manual_seed(cfg.seed)
    n = h0[0].shape[0]
    last = float("nan")

    def run(units: set[int], groups: list[dict], epochs: int) -> float:
        opt = torch.optim.Adam(groups)
        for m in graft.student_modules():
            m.train()
        loss = torch.tensor(float("nan"))
        for epoch in range(epochs):
            v = epoch % len(h0)
            for idx in batches(n, cfg.batch_size, gen):
                loss = graft_loss(graft(h0[v][idx], units), zt[v][idx])
                if not finite(loss.item()):
                    raise DataError(f"NetGraft diverged (loss {loss.item()}) grafting units {sorted(units)}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return loss.item()

    for j in range(cfg.graft_blocks + 1):                      # block-wise grafting
        main, adapters = graft.unit_params(j)
        last = run({j}, [{"params": main, "lr": cfg.block_lr},
                         {"params": adapters, "lr": cfg.adapter_lr}], cfg.block_epochs)
    for i in range(1, cfg.graft_blocks + 1):                   # net-wise grafting
        units = set(range(i + 1))
        params = [p for j in units for group in graft.unit_params(j) for p in group]
        last = run(units, [{"params": params, "lr": cfg.net_lr}], cfg.net_epochs)
    student = graft.student()
    with torch.no_grad():
        x = spec.encode(raw)
        agree = float((student(x).argmax(1) == graft(graft.prefix(x)).argmax(1)).float().mean())
    return GraftOutcome(student, graft, last, agree, time.perf_counter() - t0)


def run_netgraft(market: Market, task_models: list[str], target_classes: list[int], k: int,
                 seed: int = 0, config: NetGraftConfig | dict | None = None) -> list[BaselineResult]:
    """One result: the task models grafted into thin students, a head over their features."""
    cfg = as_config(config, NetGraftConfig)
    data = load_task(market, task_models, target_classes, k, seed)
    return [graft_and_combine(data, cfg)]


def graft_and_combine(data: TaskData, cfg: NetGraftConfig) -> BaselineResult:
    check_image(data, "NetGraft", ("vgg",))
    t0 = time.perf_counter()
    outcomes, metrics = [], {}
    for i, (model, spec, fs) in enumerate(zip(data.models, data.specs, data.sets)):
        try:
            out = graft_model(model, spec.input_spec, fs.raw, cfg)
        except DataError as e:
            seconds = time.perf_counter() - t0
            return BaselineResult("netgraft", "failed", list(data.classes), 0, 0, seconds,
                                  reason=f"{spec.id}: {e}", config=cfg.to_dict())
        outcomes.append(out)
        metrics[f"graft_loss_{i}"] = out.loss
        metrics[f"graft_agreement_{i}"] = out.agreement
        log.info("NetGraft %s: student %d params (teacher %d), agreement %.3f on its k-shot set",
                 spec.id, count_params(out.student), count_params(model), out.agreement)
    metrics["graft_seconds"] = time.perf_counter() - t0
    model, head_metrics = concat_head(data, [o.student.features for o in outcomes], "netgraft",
                                      cfg.head_config())
    metrics.update(head_metrics)
    seconds = time.perf_counter() - t0
    deploy = model.params_deployable()
    training = (sum(count_params(m) for m in data.models)
                + sum(count_params(o.graft.student_modules()) for o in outcomes) + count_params(model.head))
    metrics["student_params"] = float(sum(count_params(o.student) for o in outcomes))
    return BaselineResult("netgraft", "ok", list(data.classes), deploy, training, seconds, model,
                          metrics=metrics, config=cfg.to_dict())
