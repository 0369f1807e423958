"""A market: the stored original models and, for each, the few-shot data its developer uploaded."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from snp_ray.data.classes import class_id, class_ids
from snp_ray.data.fewshot import FewShotManifest, FewShotSet, load_fewshot, sample_k_shot
from snp_ray.artifacts import read_bytes, sha256_bytes
from snp_ray.data.tables import Split, read_split, split_from_bytes
from snp_ray.errors import ArtifactNotFoundError, IntegrityError
from snp_ray.market.modelstore import ModelSpec, ModelStore
from snp_ray.market.tasks import TASKS, model_rows
from snp_ray.models import Classifier


#: what an unknown class name is unknown to, in a market's errors
HELD = " (held by no model of this market)"


def fewshot_seed(base_seed: int, model_index: int) -> int:
    """Each developer draws its own samples: the seed mixes the market seed and the model."""
    return int(base_seed) * 1009 + int(model_index)


class Market:
    """Read access to a market store, with the train split loaded once per dataset."""

    def __init__(self, root: str | Path):
        self.store = ModelStore(root)
        self._splits: dict[str, Split] = {}
        self._models: dict[str, tuple[Classifier, ModelSpec]] = {}
        self._uploads: dict[str, Split] = {}
        self._drawn: dict[tuple[str, int, int], FewShotManifest] = {}

    @property
    def root(self) -> Path:
        return self.store.root

    def ids(self) -> list[str]:
        return self.store.ids()

    def specs(self) -> list[ModelSpec]:
        return [self.store.spec(i) for i in self.ids()]

    def spec(self, model_id: str) -> ModelSpec:
        return self.store.spec(model_id)

    def model(self, model_id: str) -> tuple[Classifier, ModelSpec]:
        if model_id not in self._models:
            self._models[model_id] = self.store.load(model_id)
        return self._models[model_id]

    def train_split(self, dataset: str) -> Split:
        if dataset not in self._splits:
            self._splits[dataset] = read_split(dataset, "train")
        return self._splits[dataset]

    def upload_split(self, model_id: str) -> Split | None:
        """The few-shot samples the developer uploaded with an added model (checked against
        their sha256), or None when the model's samples come from the dataset's train split."""
        spec = self.spec(model_id)
        info = spec.train.get("fewshot", {})
        if not isinstance(info, dict) or info.get("source") != "upload":
            return None
        if model_id not in self._uploads:
            what = f"uploaded few-shot samples of model {model_id}"
            blob = read_bytes(self.store.model_dir(model_id) / str(info["file"]), what)
            if sha256_bytes(blob) != info.get("sha256"):
                raise IntegrityError(f"{what}: sha256 mismatch (file changed or corrupt)")
            self._uploads[model_id] = split_from_bytes(blob, spec.dataset, "upload",
                                                       list(info["class_names"]), what)
        return self._uploads[model_id]

    def manifest(self, model_id: str, k: int, seed: int = 0) -> FewShotManifest:
        """The model's k-shot manifest: the stored one, or drawn now (deterministically from the
        seed) from the developer's uploaded samples when there are some, otherwise from the
        dataset's train split. Nothing is written: a read stays a read (see :meth:`keep_manifest`).

        An added model draws with the seed its developer gave ``snp market add`` (its few-shot
        source, part of its identity), whatever ``seed`` the slicing run uses, so its fragments
        are cut on the samples its few-shot accuracy was measured on."""
        spec = self.spec(model_id)
        mseed = fewshot_seed(self.draw_seed(spec, seed), spec.index)
        found = self.store.manifest(model_id, k, mseed)
        if found is not None:
            return found
        if (model_id, k, mseed) in self._drawn:
            return self._drawn[model_id, k, mseed]
        upload = self.upload_split(model_id)
        if upload is not None:
            manifest = sample_k_shot(upload.labels, spec.classes, k, mseed, spec.dataset, "upload")
        else:
            labels = self.train_split(spec.dataset).labels
            task = TASKS.get(spec.task)
            own = None if task is None else model_rows(task, spec.index, labels)
            if own is not None:    # drawn from the developer's own training rows only
                inside = np.zeros(labels.shape[0], dtype=bool)
                inside[own] = True
                labels = np.where(inside, labels, -1)
            manifest = sample_k_shot(labels, spec.classes, k, mseed, spec.dataset)
        self._drawn[model_id, k, mseed] = manifest
        return manifest

    @staticmethod
    def draw_seed(spec: ModelSpec, seed: int) -> int:
        """The seed a model's few-shot samples are drawn with: an added model's own (given to
        ``snp market add``), a trained market's models the run's ``seed``."""
        info = spec.train.get("fewshot") if spec.train.get("added") else None
        return int(info.get("seed", 0)) if isinstance(info, dict) else int(seed)

    def keep_manifest(self, model_id: str, k: int, seed: int = 0) -> FewShotManifest:
        """:meth:`manifest`, stored when drawn: market building and the slice job's driver
        write manifests once, up front, so every worker reads the same rows."""
        manifest = self.manifest(model_id, k, seed)
        if self.store.manifest(model_id, k, manifest.seed) is None:
            self.store.save_manifest(model_id, manifest)
        return manifest

    def sample_source(self, model_id: str, manifest: FewShotManifest) -> str:
        """Where the manifest's rows live (:attr:`FewShotSet.source`): the dataset's split, or
        the model's uploaded file, named by its sha256 (two uploads' row 0 differ)."""
        if manifest.split != "upload":
            return f"{manifest.dataset}/{manifest.split}"
        info = self.spec(model_id).train.get("fewshot", {})
        sha = info.get("sha256") if isinstance(info, dict) else None
        if not sha:
            raise IntegrityError(f"model {model_id}: a manifest refers to uploaded samples the "
                                 "model does not have")
        return f"upload:{sha}"

    def fewshot(self, model_id: str, k: int, seed: int = 0) -> FewShotSet:
        manifest = self.manifest(model_id, k, seed)
        source = self.sample_source(model_id, manifest)
        if manifest.split == "upload":
            split = self.upload_split(model_id)
            if split is None:
                raise IntegrityError(f"model {model_id}: a manifest refers to uploaded samples "
                                     "the model does not have")
            return load_fewshot(manifest, split, source)
        return load_fewshot(manifest, self.train_split(manifest.dataset), source)

    def add_model(self, arch: str, weights, classes: list[str], dataset: str, **options):
        """Add a developer's own trained model (see :func:`snp_ray.market.add.add_model`)."""
        from snp_ray.market.add import add_model

        result = add_model(self, arch, weights, classes, dataset, **options)
        self._forget(result.spec.id)
        return result

    def remove_model(self, model_id: str) -> ModelSpec:
        """Remove a model from the model store. Its fragments and packs live in higher layers:
        :func:`snp_ray.serve.lifecycle.remove_model` removes them too."""
        spec = self.store.remove(model_id)
        self._forget(model_id)
        return spec

    def _forget(self, model_id: str) -> None:
        self._models.pop(model_id, None)
        self._uploads.pop(model_id, None)
        self._drawn = {key: m for key, m in self._drawn.items() if key[0] != model_id}

    def holders(self, class_id: int) -> list[ModelSpec]:
        """Models that hold global class ``class_id``."""
        return [s for s in self.specs() if class_id in s.classes]

    def held_classes(self) -> dict[int, str]:
        """Every class a model of the market holds, ``{id: name}``, by id."""
        names: dict[int, str] = {}
        for s in self.specs():
            names.update(zip(s.classes, s.class_names))
        if not names:
            raise ArtifactNotFoundError(f"the market at {self.root} holds no models")
        return dict(sorted(names.items()))

    def class_ids(self, requested: list[str | int], what: str = "the pack request") -> list[int]:
        """Class names or ids -> ids, in order, against the classes the market's models hold
        (:func:`snp_ray.data.classes.class_ids`: one class at most once)."""
        return class_ids(requested, self.held_classes(), what=what, where=HELD)

    def class_id(self, name_or_id: str | int) -> int:
        """One class name or id -> its id, against the classes the market's models hold."""
        return class_id(name_or_id, self.held_classes(), where=HELD)
