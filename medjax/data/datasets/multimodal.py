"""Synthetic multimodal cases: two co-registered image modalities and a clinical record, with a label that
needs an image feature AND a tabular feature (neither alone is enough), and missingness under control.

Generative model of one case (every draw from the case's own rng, so example i of a split depends only on
(seed, split, i)):

  Latent variables: an imaging grade g ~ N(0, 1) and a laboratory value z ~ N(0, 1); sex s in {"F", "M"} with
  probability 1/2 each (s' = +1 for "F", -1 for "M"); age ~ U(30, 80) years, unrelated to the label (a distractor
  column). Label (2 classes), by `rule`:
    "sum" (default): 1 when g + z + 0.5 s' > 0. Each source alone ranks the cases only partly (the other
      latent is noise to it: a test AUC near 0.75 from a perfect reading of g alone), both together determine
      the label up to the noise of reading them; every fusion type, late ones included, can combine them.
    "interaction": 1 when sign(g) == sign(z + 0.5 s'). As g is independent of (z, s), each source alone is
      exactly at chance; fusion must model the product, which late fusion (a sum of per-source logits) cannot.
  Images, one lesion (a disc in 2D, a ball in 3D) at a random centre, seen by both modalities at the same
  place (co-registered), each reading g through its own noise (so either modality alone carries the grade):
    "t1": the lesion's radius (0.20 + 0.06 clip(g + 0.25 e1, -2, 2)) * image_size voxels, intensity 1;
    "t2": a lesion of radius 0.2 * image_size voxels whose intensity is 1 + 0.6 clip(g + 0.25 e2, -2, 2);
    both on a background 0 with Gaussian noise of sd `noise_std` (e1, e2 ~ N(0, 1)).
  Record (raw, as a CSV would hold it): "age" (years, 1 decimal), "lab" = 100 + 15 z (mg/dL, 1 decimal), "sex".

Missingness (`missing`: name -> probability, applied to every split, drawn per case): an image modality
("t1", "t2") is absent (its image all zeros and `present` 0) or a record column ("age", "lab", "sex") is
missing (None). Both images are never absent together (one of them, drawn at random, stays).

Examples: {"id": int64, "label": int32 scalar, "image": {"images": {m: float32 (*S, 1)}, "present": {m: float32
scalar}, "tabular": {"numeric": float32 (2,), "missing": float32 (2,), "categorical": int32 (1,)}}}: the model
input of `medjax.models.fusion`. The record is preprocessed by `medjax.data.tabular` with statistics fitted on
the training split's records only (`Dataset.tabular`, also in `info.multimodal`).

Registered as "synthetic_multimodal" (DATASETS).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from medjax.data import tabular
from medjax.data.datasets.base import (DATASETS, ID_STRIDE, SPLIT_CODES, Dataset, DatasetInfo, MultimodalInfo,
                                       check_index)

MODALITIES = ("t1", "t2")
NUMERIC = ("age", "lab")
CATEGORICAL = ("sex",)
CLASS_NAMES = ("negative", "positive")


RULES = ("sum", "interaction")


def _case_draws(rng: np.random.Generator, rule: str) -> Dict[str, Any]:
  # Order of draws fixed: changing it changes every dataset.
  grade, lab_z = rng.standard_normal(2)
  female = bool(rng.random() < 0.5)
  age = float(rng.uniform(30.0, 80.0))
  read1, read2 = rng.standard_normal(2)
  record_score = lab_z + (0.5 if female else -0.5)
  label = int(grade + record_score > 0) if rule == "sum" else int(np.sign(grade) == np.sign(record_score))
  return dict(grade=float(grade), label=label, read1=float(read1), read2=float(read2),
              record={"age": round(age, 1), "lab": round(100.0 + 15.0 * float(lab_z), 1),
                      "sex": "F" if female else "M"})


class _Source:
  """One split: case i from rng [seed, split_code, i]; images made on demand, records kept (they are small)."""

  def __init__(self, split: str, length: int, *, seed: int, spatial_dims: int, image_size: int, noise_std: float,
               missing: Mapping[str, float], rule: str):
    self.split, self.length = split, int(length)
    self.split_code = SPLIT_CODES[split]
    self.seed, self.spatial_dims, self.image_size, self.noise_std = seed, spatial_dims, image_size, noise_std
    self.cases = []
    for i in range(self.length):
      rng = self._rng(i, 0)
      case = _case_draws(rng, rule)
      drop = {name: bool(rng.random() < missing.get(name, 0.0)) for name in MODALITIES + NUMERIC + CATEGORICAL}
      if drop["t1"] and drop["t2"]:  # one image always stays
        drop["t1" if rng.random() < 0.5 else "t2"] = False
      case["present"] = {m: not drop[m] for m in MODALITIES}
      case["record"] = {k: (None if drop[k] else v) for k, v in case["record"].items()}
      self.cases.append(case)
    self.preprocessor: Optional[tabular.TabularPreprocessor] = None  # set by the builder (training statistics)

  def _rng(self, i: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, self.split_code, i, stream])

  def __len__(self) -> int:
    return self.length

  def case_name(self, i: int) -> str:
    return f"{self.split} case {i}"

  def case_id(self, i: int) -> int:
    return self.split_code * ID_STRIDE + i

  def labels(self) -> np.ndarray:
    return np.asarray([c["label"] for c in self.cases], np.int32)

  def records(self) -> Sequence[Mapping[str, Any]]:
    return [c["record"] for c in self.cases]

  def _images(self, i: int, case: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    rng = self._rng(i, 1)
    n, d = self.image_size, self.spatial_dims
    centre = rng.uniform(0.35 * n, 0.65 * n, size=d)
    grid = np.indices((n,) * d, dtype=np.float32) + 0.5
    dist = np.sqrt(sum((grid[k] - np.float32(centre[k])) ** 2 for k in range(d)))
    radius1 = (0.20 + 0.06 * np.clip(case["grade"] + 0.25 * case["read1"], -2, 2)) * n
    contrast2 = 1.0 + 0.6 * np.clip(case["grade"] + 0.25 * case["read2"], -2, 2)
    clean = {"t1": (dist <= radius1).astype(np.float32),
             "t2": (dist <= 0.2 * n).astype(np.float32) * np.float32(contrast2)}
    out = {}
    for name in MODALITIES:
      noisy = clean[name] + np.float32(self.noise_std) * rng.standard_normal(clean[name].shape).astype(np.float32)
      out[name] = (noisy if case["present"][name] else np.zeros_like(noisy))[..., None].astype(np.float32)
    return out

  def __getitem__(self, index: int) -> Dict[str, Any]:
    i = check_index(index, self.length, self.split)
    case = self.cases[i]
    return {"id": np.asarray(self.case_id(i), np.int64), "label": np.asarray(case["label"], np.int32),
            "image": {"images": self._images(i, case),
                      "present": {m: np.asarray(float(case["present"][m]), np.float32) for m in MODALITIES},
                      "tabular": self.preprocessor.transform(case["record"], self.case_name(i))}}


@DATASETS.register("synthetic_multimodal")
def synthetic_multimodal(spatial_dims: int = 2, image_size: int = 24, num_train: int = 512, num_val: int = 128,
                         num_test: int = 512, seed: int = 0, noise_std: float = 0.3,
                         missing: Optional[Mapping[str, float]] = None, rule: str = "sum") -> Dataset:
  """The synthetic multimodal set (module doc): `spatial_dims` 2 or 3, cubes/squares of `image_size` voxels,
  split sizes, a seed, image noise sd, `missing`: {"t1" | "t2" | "age" | "lab" | "sex": probability}, and the
  label `rule` ("sum" or "interaction")."""
  missing = dict(missing or {})
  known = MODALITIES + NUMERIC + CATEGORICAL
  for name, p in missing.items():
    if name not in known:
      raise ValueError(f"config.data.missing: unknown source {name!r}; choose from {known}.")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
      raise ValueError(f"config.data.missing.{name} must be a probability in [0, 1), got {p!r}.")
  if rule not in RULES:
    raise ValueError(f"config.data.rule must be one of {RULES}, got {rule!r}.")
  if spatial_dims not in (2, 3):
    raise ValueError(f"config.data.spatial_dims must be 2 or 3, got {spatial_dims!r}.")
  if image_size < 8:
    raise ValueError(f"config.data.image_size must be >= 8, got {image_size!r}.")
  kwargs = dict(seed=int(seed), spatial_dims=spatial_dims, image_size=int(image_size), noise_std=float(noise_std),
                missing=missing, rule=rule)
  sources = {split: _Source(split, n, **kwargs)
             for split, n in (("train", num_train), ("val", num_val), ("test", num_test))}
  train = sources["train"]
  spec = tabular.TabularSpec(numeric=NUMERIC, categorical=CATEGORICAL)
  # Training statistics only: the preprocessor never sees a validation or test record.
  preprocessor = tabular.fit(train.records(), spec, [train.case_name(i) for i in range(len(train))])
  for source in sources.values():
    source.preprocessor = preprocessor
  multimodal = MultimodalInfo(
      modalities=MODALITIES, shapes=((image_size,) * spatial_dims,) * 2, channels=(1, 1), numeric=NUMERIC,
      categorical=CATEGORICAL, categorical_sizes=tuple(preprocessor.cardinalities),
      may_be_missing=tuple(m for m in MODALITIES if missing.get(m, 0) > 0))
  info = DatasetInfo(task="classification", spatial_dims=spatial_dims, image_shape=(image_size,) * spatial_dims,
                     num_channels=1, num_classes=2, class_names=CLASS_NAMES, label_kind="class",
                     multimodal=multimodal)
  return Dataset(info=info, sources=sources)


class WithAbsent:
  """A view of a multimodal split in which the sources `absent` are missing from every case: the named image
  modalities zeroed with present 0, and for "tabular" every value marked missing. For measuring what a model
  loses when a modality is unavailable at inference (`medjax.tools.evaluate --absent`).

  Raises ValueError naming the source when `absent` names something the examples do not hold."""

  def __init__(self, source: Any, absent: Sequence[str]):
    self.source, self.absent = source, tuple(absent)
    example = source[0]["image"] if len(source) else None
    if not isinstance(example, Mapping) or "images" not in example:
      raise ValueError(f"absent modalities {self.absent}: these examples hold one image, not named modalities.")
    known = tuple(example["images"]) + (("tabular",) if "tabular" in example else ())
    for name in self.absent:
      if name not in known:
        raise ValueError(f"absent modality {name!r}: the examples hold {known}.")

  def __len__(self) -> int:
    return len(self.source)

  def __getattr__(self, name: str) -> Any:  # labels(), case_name(), ... of the wrapped split
    return getattr(self.source, name)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    example = dict(self.source[index])
    inputs = dict(example["image"])
    images, present = dict(inputs["images"]), dict(inputs["present"])
    for name in self.absent:
      if name == "tabular":
        tab = inputs["tabular"]
        inputs["tabular"] = {"numeric": np.zeros_like(tab["numeric"]), "missing": np.ones_like(tab["missing"]),
                             "categorical": np.zeros_like(tab["categorical"])}
      else:
        images[name] = np.zeros_like(images[name])
        present[name] = np.zeros_like(present[name])
    inputs["images"], inputs["present"] = images, present
    example["image"] = inputs
    return example
