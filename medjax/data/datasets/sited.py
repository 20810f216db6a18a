"""`sites`: any dataset split into federated sites, with optional scanner skew, harmonisation and a held-out site.

  config.data = dict(name="sites", base=dict(name="medmnist", subset="pathmnist", data_dir=...), num_sites=4,
                     split="dirichlet", alpha=0.5, feature_skew=0.5, holdout_site=3, harmonise="histogram")

Every base split is partitioned on its own with the same method, seeded by (seed, split name), so each site
has its own train/val/test, and every example gains an int32 scalar "site":

  split="dirichlet"  label skew (`sites.dirichlet_label_split`, Hsu et al. 2019); classes from the labels
                     (a segmentation case counts as its highest class present, a multi-label case as its first
                     positive finding + 1, or 0 with none)
  split="quantity"   site sizes ~ Dirichlet(alpha), labels IID
  split="iid"        equal random sites
  split="column"     sites from the example key (or `metadata(split)` column) `site_key`; sites are the
                     column's distinct values in sorted order over all splits (`site_names`)

`feature_skew` > 0 makes each site's images look as if from a different scanner (`sites.feature_skews`),
deterministically per (seed, site, example id). `harmonise` ("zscore" or "histogram", see
`harmonise.SiteIntensityNormaliser` / `harmonise.HistogramMatcher`) is fit on the skewed "train" split, each site on
its own training images only, and applied to every split. A held-out site is fit on the intensities of its own
"external_train" images (no labels are read): a new hospital can always compute its own intensity statistics,
and without them it could not be harmonised at all.

Splits: "train", "val", "test" (every site, or with `holdout_site=k` every site but k); with a held-out site
also "external_train", "external_val", "external_test" (site k only, for external-site evaluation: train on
some hospitals, test on an unseen one); and "site{j}_{split}" for every site j (per-site evaluation). An
example keeps the base id, so the same case has the same id in every split that holds it. `info` is the base's.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from medjax.data import harmonise as harmonise_lib
from medjax.data import sites as site_lib
from medjax.data.datasets.base import DATASETS, Dataset, DatasetInfo, check_index

METHODS = ("dirichlet", "quantity", "iid", "column")
HARMONISERS = ("zscore", "histogram")
DEFAULT_NUM_SITES = 4


class SitedSource:
  """The examples `indices` of a base source, each with its "site" (and its site's skew and harmonisation)."""

  def __init__(self, base: Any, indices: np.ndarray, sites: np.ndarray, split: str, seed: int,
               skews: Optional[Sequence[site_lib.FeatureSkew]] = None, harmoniser: Any = None):
    self.base, self.split, self.seed = base, split, int(seed)
    self.indices = np.asarray(indices, np.int64)
    self.sites = np.asarray(sites, np.int32)
    self.skews, self.harmoniser = skews, harmoniser

  def __len__(self) -> int:
    return len(self.indices)

  def site_ids(self) -> np.ndarray:
    """int32 (N,) site of each example, in example order."""
    return self.sites

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    i = check_index(index, len(self), self.split)
    example = dict(self.base[int(self.indices[i])])
    site = int(self.sites[i])
    example["image"] = self.prepare(example["image"], site, int(example.get("id", self.indices[i])))
    example["site"] = np.asarray(site, np.int32)
    return example

  def prepare(self, image: np.ndarray, site: int, example_id: int) -> np.ndarray:
    """The base image as site `site`'s scanner shows it, then harmonised (when configured)."""
    if self.skews is not None and not self.skews[site].is_identity:
      # Tag 1 keeps these streams apart from the split seeds ([seed, split hash]).
      rng = np.random.default_rng([self.seed, 1, site, example_id % 2**63])
      image = self.skews[site].apply(image, rng)
    if self.harmoniser is not None:
      image = self.harmoniser.transform(image, site)
    return image

  def __getattr__(self, name: str):
    # Per-example answers of the base ("labels", "patient_ids") follow the subset, and exist only where the
    # base has them, so `hasattr` tells callers (folds, label checks) the truth.
    if name in ("labels", "patient_ids") and "base" in self.__dict__ and hasattr(self.base, name):
      return lambda: np.asarray(getattr(self.base, name)())[self.indices]
    raise AttributeError(name)

  def __repr__(self) -> str:
    return f"SitedSource(split={self.split!r}, n={len(self)}, sites={np.bincount(self.sites).tolist()})"


@dataclasses.dataclass(frozen=True)
class SitedDataset(Dataset):
  """A `Dataset` whose examples belong to sites: `num_sites`, `site_names`, `site_of(split)`, `harmoniser`."""
  num_sites: int = 0
  site_names: tuple = ()
  holdout_site: Optional[int] = None
  harmoniser: Any = dataclasses.field(default=None, hash=False, compare=False)
  skews: tuple = dataclasses.field(default=(), hash=False, compare=False)

  def __getstate__(self):
    return dict(super().__getstate__(), num_sites=self.num_sites, site_names=self.site_names,
                holdout_site=self.holdout_site, harmoniser=self.harmoniser, skews=self.skews)

  def __setstate__(self, state):
    super().__setstate__(state)
    for key in ("num_sites", "site_names", "holdout_site", "harmoniser", "skews"):
      object.__setattr__(self, key, state[key])

  def site_of(self, split: str) -> np.ndarray:
    """int32 (N,) site of each example of `split`, in example order."""
    return self.source(split).site_ids()

  def summary(self) -> Dict[str, Any]:
    """JSON-able description for logs: per split (per-site splits aside) the counts per site, and per class
    per site where the source answers `labels()` cheaply; plus the skews and the fitted harmonisation."""
    out: Dict[str, Any] = {"num_sites": self.num_sites, "site_names": list(self.site_names),
                           "holdout_site": self.holdout_site, "splits": {}}
    for split in self.splits:
      if split.startswith("site"):
        continue
      src = self.source(split)
      labels = src.labels() if self.info.label_kind == "class" and hasattr(src, "labels") else None
      if labels is not None and np.asarray(labels).ndim != 1:
        labels = None  # multi-label
      out["splits"][split] = site_lib.summarise_sites(src.site_ids(), labels, self.info.num_classes,
                                                      num_sites=self.num_sites)
    out["feature_skews"] = [s.to_dict() for s in self.skews]
    out["harmonisation"] = None if self.harmoniser is None else self.harmoniser.to_dict()
    return out


def _fail(key: str, message: str) -> None:
  raise ValueError(f"dataset 'sites': config.data.{key} {message}")


def _class_of_examples(source: Any, info: DatasetInfo) -> np.ndarray:
  """int (N,) one class per example, for label-skewed splits."""
  if info.label_kind == "class" and hasattr(source, "labels"):
    labels = np.asarray(source.labels())
  else:
    labels = [np.asarray(source[i]["label"]) for i in range(len(source))]
    if info.label_kind == "map":
      return np.asarray([int(label.max()) if label.size else 0 for label in labels], np.int64)
    labels = np.asarray(labels)
  if labels.ndim == 2:  # multi-label findings
    return np.where(labels.any(axis=1), labels.argmax(axis=1) + 1, 0)
  return labels.astype(np.int64)


def _column_values(dataset: Dataset, split: str, key: str) -> List[Any]:
  if hasattr(dataset, "metadata"):
    table = dataset.metadata(split)
    if key in table:
      return list(np.asarray(table[key]).tolist())
  source = dataset.source(split)
  values = []
  for i in range(len(source)):
    example = source[i]
    if key not in example:
      _fail("site_key", f"= {key!r} is not a key of the examples of split {split!r} (keys: {sorted(example)}).")
    value = np.asarray(example[key])
    values.append(value.item() if value.ndim == 0 else str(value.tolist()))
  return values


def _split_seed(seed: int, split: str) -> List[int]:
  return [int(seed), zlib.crc32(split.encode())]


@DATASETS.register("sites")
def sites(*, base: Mapping[str, Any], num_sites: Optional[int] = None, split: str = "dirichlet",
          alpha: float = 0.5, site_key: Optional[str] = None, feature_skew: float = 0.0,
          holdout_site: Optional[int] = None, harmonise: Optional[str] = None, reference_site: int = 0,
          min_per_site: int = 1, seed: int = 0) -> SitedDataset:
  """The base dataset split into sites (module docstring).

  Args:
    base: the wrapped dataset's config, a dict with "name" (a registered dataset) and its keyword arguments.
    num_sites: number of sites (default 4); for split="column" the column decides and a given value must
      match it.
    split: "dirichlet", "quantity", "iid" or "column".
    alpha: Dirichlet concentration for "dirichlet" / "quantity" (small = skewed).
    site_key: example key (or `metadata` column) holding the site, for "column".
    feature_skew: strength of the per-site scanner skew (0 = none; 1 = the ranges of `sites.feature_skews`).
    holdout_site: a site kept out of train/val/test and served as "external_*" splits; None = none.
    harmonise: None, "zscore" or "histogram".
    reference_site: the site whose intensity distribution "histogram" maps onto (not the held-out one).
    min_per_site: smallest site size per split for the simulated splits.
    seed: seeds the split of every base split (with the split's name) and the skews.
  Raises ValueError naming the config key at fault.
  """
  base = dict(base)
  name = base.pop("name", None)
  if name is None:
    _fail("base", f"has no 'name' (got keys {sorted(base)}); give the wrapped dataset's config.")
  if split not in METHODS:
    _fail("split", f"must be one of {METHODS}, got {split!r}.")
  if harmonise not in (None, *HARMONISERS):
    _fail("harmonise", f"must be None or one of {HARMONISERS}, got {harmonise!r}.")
  if not isinstance(feature_skew, (int, float)) or isinstance(feature_skew, bool) or not 0 <= feature_skew < np.inf:
    _fail("feature_skew", f"must be a finite number >= 0, got {feature_skew!r}.")
  if num_sites is not None and (not isinstance(num_sites, int) or isinstance(num_sites, bool) or num_sites < 1):
    _fail("num_sites", f"must be an int >= 1, got {num_sites!r}.")
  if split == "column" and not site_key:
    _fail("site_key", "must name the example key holding the site when split='column', got None.")
  dataset = DATASETS.build(name, base, where="config.data.base")
  info = dataset.info

  assignments: Dict[str, np.ndarray] = {}
  site_names: List[Any]
  if split == "column":
    values = {s: _column_values(dataset, s, site_key) for s in dataset.splits}
    every = [v for s in dataset.splits for v in values[s]]
    _, site_names = site_lib.column_split(every)
    lookup = {v: j for j, v in enumerate(site_names)}
    assignments = {s: np.asarray([lookup[v] for v in values[s]], np.int32) for s in dataset.splits}
    if num_sites is not None and num_sites != len(site_names):
      _fail("num_sites", f"= {num_sites} but column {site_key!r} holds {len(site_names)} sites: {site_names}.")
    num_sites = len(site_names)
  else:
    num_sites = DEFAULT_NUM_SITES if num_sites is None else num_sites
    site_names = list(range(num_sites))
    for s in dataset.splits:
      n = len(dataset.source(s))
      if n == 0:
        assignments[s] = np.zeros(0, np.int32)
        continue
      if num_sites > n:
        _fail("num_sites", f"= {num_sites} is more than the {n} examples of split {s!r}.")
      try:
        if split == "dirichlet":
          labels = _class_of_examples(dataset.source(s), info)
          assignments[s] = site_lib.dirichlet_label_split(labels, num_sites, alpha, _split_seed(seed, s),
                                                          min_per_site)
        elif split == "quantity":
          assignments[s] = site_lib.quantity_split(n, num_sites, alpha, _split_seed(seed, s), min_per_site)
        else:
          assignments[s] = site_lib.iid_split(n, num_sites, _split_seed(seed, s))
      except ValueError as e:
        raise ValueError(f"dataset 'sites': split {s!r} of config.data.base ({name}): {e}") from None

  if holdout_site is not None and (not isinstance(holdout_site, int) or not 0 <= holdout_site < num_sites):
    _fail("holdout_site", f"must be None or a site in [0, {num_sites}), got {holdout_site!r}.")
  skews = tuple(site_lib.feature_skews(num_sites, float(feature_skew), [int(seed), 2]))

  harmoniser = None
  if harmonise is not None:
    if not isinstance(reference_site, int) or not 0 <= reference_site < num_sites:
      _fail("reference_site", f"must be a site in [0, {num_sites}), got {reference_site!r}.")
    if reference_site == holdout_site:
      _fail("reference_site", f"= {reference_site} is the held-out site; pick one of the training sites.")
    if "train" not in dataset.splits:
      _fail("harmonise", f"needs a 'train' split to fit on; config.data.base ({name}) has {dataset.splits}.")
    train = SitedSource(dataset.source("train"), np.arange(len(dataset.source("train"))), assignments["train"],
                        "train", seed, skews)
    harmoniser = (harmonise_lib.SiteIntensityNormaliser() if harmonise == "zscore"
                  else harmonise_lib.HistogramMatcher(reference_site=reference_site))
    try:
      harmoniser.fit((train[i]["image"] for i in range(len(train))), train.site_ids())
    except ValueError as e:
      raise ValueError(f"dataset 'sites': config.data.harmonise={harmonise!r}: {e}") from None

  def subset(s: str, keep: np.ndarray, new_name: str) -> SitedSource:
    indices = np.flatnonzero(keep)
    return SitedSource(dataset.source(s), indices, assignments[s][indices], new_name, seed, skews, harmoniser)

  sources: Dict[str, SitedSource] = {}
  for s in dataset.splits:
    everyone = np.ones(len(assignments[s]), bool)
    sources[s] = subset(s, everyone if holdout_site is None else assignments[s] != holdout_site, s)
  if holdout_site is not None:
    for s in dataset.splits:
      sources[f"external_{s}"] = subset(s, assignments[s] == holdout_site, f"external_{s}")
  for j in range(num_sites):
    for s in dataset.splits:
      sources[f"site{j}_{s}"] = subset(s, assignments[s] == j, f"site{j}_{s}")
  return SitedDataset(info=info, sources=sources, num_sites=num_sites, site_names=tuple(site_names),
                      holdout_site=holdout_site, harmoniser=harmoniser, skews=skews)
