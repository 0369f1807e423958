"""The mixed market's library pieces (snp_ray.market.mixed, evaluation.mixed, engine.mixed),
without training or slicing: its members cover T1's groups, the developer's recipe and `snp
market add` arguments, each model's fragments under its own slicing config, the slice jobs per
chosen config, the family summary, and the job's flags as the `mixed` stage passes them."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from snp_ray.data.specs import ImageSpec
from snp_ray.errors import UnknownNameError
from snp_ray.market.mixed import (DATASET, MEMBER_SETS, MEMBERS, add_args, default_pack_classes,
                                  member_set, t1_groups, train_config)
from snp_ray.market.modelstore import ModelSpec
from snp_ray.slicing.api import pair_key
from snp_ray.tuning.select import parse_candidates

REPO = Path(__file__).resolve().parents[1]


def test_members_split_t1_between_three_families(real_data):
    assert [m.class_ids() for m in MEMBERS] == t1_groups() == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [m.arch for m in MEMBERS] == ["torchvision:resnet18", "snp:vgg11?width=0.25",
                                         "torchvision:mobilenet_v2?width_mult=0.5"]
    assert [m.input_size for m in MEMBERS] == [32, 32, 64]
    assert default_pack_classes() == ["airplane", "cat", "frog"]
    from snp_ray.models.refs import parse_ref

    assert [parse_ref(m.arch).external for m in MEMBERS] == [True, False, True]


def test_the_vit_set_puts_the_zoo_vit_in_the_resnets_place(real_data):
    """Member sets are data: "cnn" is today's (the default), "vit" swaps the ResNet-18 for the
    zoo ViT on its classes and budget, trained by the ViT recipe (AdamW)."""
    from snp_ray.market.training import ARCH_TRAIN

    assert member_set("cnn") is MEMBERS and list(MEMBER_SETS) == ["cnn", "vit"]
    vit, vgg, mobilenet = member_set("vit")
    resnet = MEMBERS[0]
    assert (vit.id, vit.arch, vit.classes, vit.input_size) == ("vit", "snp:vit", resnet.classes, 32)
    assert (vgg, mobilenet) == tuple(MEMBERS[1:])
    assert [m.class_ids() for m in member_set("vit")] == t1_groups()
    assert default_pack_classes(member_set("vit")) == ["airplane", "cat", "frog"]
    cfg = train_config(vit)
    assert (cfg.epochs, cfg.train_fraction, cfg.optimizer, cfg.lr, cfg.weight_decay) == (
        resnet.epochs, resnet.train_fraction, "adamw", ARCH_TRAIN["vit"]["lr"],
        ARCH_TRAIN["vit"]["weight_decay"])
    assert train_config(resnet).optimizer == "auto"                     # the CNNs' recipe as before
    with pytest.raises(UnknownNameError):
        member_set("vits")


def test_the_developers_recipe_and_add_arguments():
    resnet, vgg, mobilenet = MEMBERS
    cfg = train_config(vgg)
    assert (cfg.epochs, cfg.train_fraction, cfg.seed, cfg.threads) == (15, 0.4, 0, 1)
    assert train_config(mobilenet, epochs_scale=0.25).epochs == 2
    assert train_config(resnet, epochs_scale=0.01).epochs == 1          # at least one epoch
    assert train_config(resnet, train_fraction=0.1).train_fraction == 0.1
    args = add_args(mobilenet, Path("m"), Path("m/w.safetensors"),
                    {"mean": [0.5, 0.25, 1 / 3], "std": [0.2, 0.2, 0.2]}, k=10)
    flags = dict(zip(args[2::2], args[3::2]))
    assert args[:2] == ["market", "add"] and "--replace" not in args
    assert flags == {"--store": "m", "--arch": mobilenet.arch, "--weights": "m/w.safetensors",
                     "--classes": "frog,horse,ship,truck", "--dataset": DATASET, "--k": "10",
                     "--id": "mobilenet_v2-w0.5", "--input-size": "64",
                     "--mean": "0.500000,0.250000,0.333333", "--std": "0.200000,0.200000,0.200000"}
    assert add_args(mobilenet, Path("m"), Path("w"), {"mean": [0], "std": [1]}, 10,
                    replace=True)[-1] == "--replace"


def _spec(mid: str, classes: list[int]) -> ModelSpec:
    return ModelSpec(id=mid, task="mixed", index=0, arch="vgg11", width=0.25, dataset=DATASET,
                     classes=classes, class_names=[f"c{c}" for c in classes],
                     input=ImageSpec().to_dict(),
                     weights_sha256=mid[0] * 64)


def test_each_model_packs_its_fragments_of_its_own_slicing_config():
    from snp_ray.evaluation.mixed import chosen_keys, slice_config_of

    specs = {"a": _spec("a", [0, 3]), "b": _spec("b", [3, 5])}

    class _Market:
        def holders(self, c):
            return [s for s in specs.values() if c in s.classes]

    quick, dw = parse_candidates("quick,quick-dw1.0")
    chosen = {"a": quick, "b": dw}
    keys = chosen_keys(_Market(), [3, 0], 10, chosen)
    assert keys == [pair_key(specs["a"], 3, quick.config(), 10, 0),
                    pair_key(specs["b"], 3, dw.config(), 10, 0),
                    pair_key(specs["a"], 0, quick.config(), 10, 0)]
    assert quick.config().digest() != dw.config().digest()
    assert slice_config_of("b", "smoke", chosen).digest() == dw.config().digest()
    from snp_ray.slicing import slice_preset

    assert slice_config_of("b", "smoke", None).digest() == slice_preset("smoke").digest()


def test_one_slice_job_per_chosen_config():
    from snp_ray.engine.mixed import slice_jobs

    quick, dw = parse_candidates("quick,quick-dw1.0")
    jobs = slice_jobs(Path("m"), 10, "auto", {"a": quick, "b": dw, "c": quick})
    assert [(j.models, j.preset, j.overrides) for j in jobs] == [
        (["a", "c"], "quick", {}), (["b"], "quick", {"depthwise_rate": 1.0})]
    assert all(j.k == 10 and j.market == "m" for j in jobs)
    (one,) = slice_jobs(Path("m"), 5, "quick", None)
    assert (one.preset, one.k, one.models) == ("quick", 5, [])


def test_family_summary():
    from snp_ray.evaluation.mixed import family_summary

    rows = [{"model": m.id, "seconds": s, "param_ratio": r, "test_auc": a, "source_params": 100}
            for m in MEMBERS for s, r, a in ((1.0, 0.2, 0.9), (3.0, 0.4, 0.7), (2.0, 0.3, 0.8))]
    fam = family_summary(MEMBERS, rows, "quick")
    assert list(fam) == [m.id for m in MEMBERS]
    assert fam["vgg11-w0.25"] == {"arch": "snp:vgg11?width=0.25", "input_size": 32,
                                  "slice_config": "quick", "source_params": 100,
                                  "slice_seconds_median": 2.0,
                                  "param_ratio_mean": pytest.approx(0.3),
                                  "test_auc_min": 0.7, "test_auc_mean": pytest.approx(0.8)}


def test_the_job_takes_the_mixed_stage_flags():
    """The `mixed` stage of make results runs the job with these flags (reproduce.py): each
    lands in the library's config."""
    from snp_ray.engine.mixed import MixedJobConfig
    from snp_ray.evaluation.reproduce import STAGES

    stage = STAGES["mixed"]
    (cmd,) = stage.commands
    assert cmd[1] == "jobs/build_mixed_market.py"
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        spec = importlib.util.spec_from_file_location("build_mixed_market",
                                                      REPO / "jobs" / "build_mixed_market.py")
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
    finally:
        sys.path.remove(str(REPO / "jobs"))
    a = job.parse([c.replace("{runs}", "r").replace("{out}", "o") for c in cmd[2:]])
    assert a.json
    cfg = MixedJobConfig(**{k: v for k, v in vars(a).items() if k != "json"})
    assert (cfg.store, cfg.k, cfg.slice_preset, cfg.auto_models, cfg.candidates, cfg.out) == (
        "r/mixed", 10, "auto", "mobilenet_v2-w0.5", "quick,quick-dw1.0", "o/mixed")
    assert MixedJobConfig(**{k: v for k, v in vars(job.parse([])).items() if k != "json"}) == \
        MixedJobConfig()                                  # the flags' defaults are the config's
    assert cfg.members == "cnn" and "--members" not in cmd  # the published command, unchanged
    (vit_cmd,) = STAGES["mixed-vit"].commands
    b = job.parse([c.replace("{runs}", "r").replace("{out}", "o") for c in vit_cmd[2:]])
    assert vars(b) == {**vars(a), "members": "vit", "out": "o/mixed-vit"}   # same k, preset, candidates
    assert STAGES["mixed-vit"].outputs == ("mixed-vit/mixed.json",)
    assert STAGES["mixed-vit"].digests() == stage.digests()
