"""Multimodal cases from a folder: several named image modalities per case plus a clinical record from the CSV.

Reached through the "image_folder" / "nifti_folder" builder when `modalities` is set (classification only):

  config.data = dict(name="image_folder", data_dir=..., csv_path=..., spatial_dims=3,
                     modalities=["t1", "t2", "flair"],          # the order models see them in
                     optional_modalities=["flair"],             # a case may lack these; the others are required
                     tabular={"numeric": ["age", "lab"], "categorical": ["sex"]},   # CSV columns, or None
                     patch_size={"t1": (32, 32, 32), "t2": (32, 32, 32), "flair": (16, 32, 32)},  # or one for all
                     target_spacing_mm={"t1": (1.0, 1.0, 1.0), ...},  # or one for all, or None (no resampling)
                     normalization={"t1": "zscore", "t2": "zscore", "flair": "none"})  # or one for all

Layout:
  <data_dir>/images/<modality>/<case><suffix>   one folder per modality, any suffix `io.read_image` reads
  csv_path (required): columns case, label[, patient_id, split] and the tabular columns (image_folder's CSV)

Each modality is preprocessed on its own (`volumes.preprocess_case`: RAS+ reorientation, optional nonzero crop,
resampling to its own `target_spacing_mm`, then its own normalisation), so modalities need not be co-registered
and may differ in spacing, shape and channels; they must share the rank (`spatial_dims`). Examples must have one
shape per modality to batch, so every modality's preprocessed image is brought to its `patch_size` by a centre
crop (axes longer than the patch; the border is lost, with a warning once per split and modality) and a
symmetric zero pad (axes shorter; the extra voxel after). Choose patch_size and target_spacing_mm so the
region of interest fits (`python -m medjax.tools.plan` gives a case's resampled shape); `config.input.patch_size`
must stay unset (the examples are fixed-size already).

Examples (the model input of `medjax.models.fusion`, as the synthetic_multimodal set gives it):
  {"id": int64 (the case's index in the sorted CSV cases), "label": int32 scalar,
   "image": {"images": {m: float32 (*patch_m, C_m)}, "present": {m: float32 scalar},
             "tabular": {"numeric": float32 (F,), "missing": float32 (F,), "categorical": int32 (K,)}}}
An absent optional modality is zeros with present 0; "tabular" is there only when columns are declared.

The record is preprocessed by `medjax.data.tabular` with statistics fitted on the TRAINING split's CSV rows only
(case names as ids; `source.preprocessor`, shared by every split); every row of every split is transformed once
when the dataset is built, so a bad value anywhere stops the run before training, and an unseen category warns
then (naming case and column) and maps to 0.

Refused when the dataset is built (ValueError naming the case and the modality or column): a case without a
file for a required modality; a case with no modality file at all; a file in a modality folder with no CSV row;
an unknown modality in optional_modalities or in a per-modality dict; a non-numeric value in a numeric column;
a declared column the CSV lacks; segmentation (a labels/ folder) with modalities.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from medjax.data import io, tabular as tabular_lib
from medjax.data.datasets import volumes
from medjax.data.datasets.base import DatasetInfo, MultimodalInfo, check_index, check_present

LAYOUT = ("<data_dir>/images/<modality>/<case><suffix> (one folder per modality; suffix: one of "
          f"{', '.join(io.IMAGE_SUFFIXES)}) and a CSV with columns case, label[, patient_id, split] and the "
          "tabular columns")
RESERVED = ("case", "patient_id", "label", "split")  # CSV columns that are no clinical feature
PER_MODALITY = ("num_channels", "patch_size", "target_spacing_mm", "plan_path", "normalization", "intensity_stats")
SEGMENTATION_HINT = ("several image modalities per case are supported for classification only; for segmentation, "
                     "stack the co-registered modalities into one multi-channel 4D image per case "
                     "(images/<case>.nii.gz with C channels, num_channels=C) and leave modalities unset")


def _is_mapping(value: Any) -> bool:
  # ConfigDict is no collections.abc.Mapping; anything with keys() and items() counts.
  return isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "items")
                                        and not isinstance(value, (str, bytes)))


def check_single_image(where: str, *, optional_modalities, tabular, **values) -> None:
  """Raises ValueError naming the key when a multimodal option is set without `modalities`."""
  if optional_modalities:
    raise ValueError(f"{where}: optional_modalities={list(optional_modalities)!r} needs modalities (the list of "
                     "image modalities, images/<modality>/<case><suffix>).")
  if tabular is not None:
    raise ValueError(f"{where}: tabular needs modalities (a list of image modalities, one is enough): the model "
                     "input with a clinical record is a dict of named images and the record.")
  for key, value in values.items():
    if _is_mapping(value):
      raise ValueError(f"{where}: {key} is a dict (one value per modality), but modalities is unset.")


def check_request(root: str, csv_path: Optional[str], where: str) -> None:
  """Refuses segmentation (a labels/ folder) and a missing csv_path, before the CSV is read."""
  if os.path.isdir(os.path.join(root, "labels")):
    raise ValueError(f"{where}: {root}/labels exists, but {SEGMENTATION_HINT}.")
  if csv_path is None:
    raise ValueError(f"{where}: modalities need csv_path (case, label[, patient_id, split] and the tabular "
                     f"columns). Expected layout: {LAYOUT}.")


def per_modality(value: Any, key: str, modalities: Sequence[str], where: str) -> Dict[str, Any]:
  """{modality: value}: a dict modality -> value must name every modality and no other; anything else is one
  value shared by all."""
  if not _is_mapping(value):
    return dict.fromkeys(modalities, value)
  value = dict(value.items())
  unknown = [k for k in value if k not in modalities]
  if unknown:
    raise ValueError(f"{where}: {key} names unknown modality(ies) {unknown}; the modalities are {list(modalities)}.")
  missing = [m for m in modalities if m not in value]
  if missing:
    raise ValueError(f"{where}: {key} gives no value for modality(ies) {missing}; give one value per modality or "
                     "one value for all.")
  return value


def _names(modalities: Any, optional: Any, where: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
  if isinstance(modalities, str) or not isinstance(modalities, Sequence) or not modalities:
    raise ValueError(f"{where}: modalities must be a non-empty list of names (folders under images/), got "
                     f"{modalities!r}.")
  names = tuple(modalities)
  for name in names:
    if not isinstance(name, str) or not name or name.startswith(".") or os.sep in name or name == "tabular":
      raise ValueError(f"{where}: modality name {name!r} must be a folder name under images/ (not hidden, no "
                       "path separator, not 'tabular', which names the record).")
  if len(set(names)) != len(names):
    raise ValueError(f"{where}: modalities {list(names)} repeat a name.")
  optional = () if optional is None else ((optional,) if isinstance(optional, str) else tuple(optional))
  unknown = [m for m in optional if m not in names]
  if unknown:
    raise ValueError(f"{where}: optional_modalities names unknown modality(ies) {unknown}; the modalities are "
                     f"{list(names)}.")
  return names, tuple(m for m in names if m in optional)


@dataclasses.dataclass(frozen=True)
class Modality:
  """One image modality: its name, preprocessing settings, example shape and (for "ct") intensity statistics."""
  name: str
  settings: volumes.Settings
  patch_size: Tuple[int, ...]
  stats: Optional[Tuple[Mapping[str, float], ...]] = None


@dataclasses.dataclass(frozen=True)
class MultimodalCase:
  """One case: `files` maps each modality it has to its image file (absent modalities are not keys)."""
  name: str
  patient_id: str
  class_label: int
  files: Mapping[str, str]


def _settings(names, options: Mapping[str, Any], *, spatial_dims: int, num_classes: int, crop_nonzero: bool,
              image_order: int, where: str) -> Dict[str, Tuple[volumes.Settings, Tuple[int, ...], Any]]:
  """{modality: (Settings, patch_size, intensity_stats option)} from the builder's per-modality options."""
  values = {key: per_modality(options[key], key, names, where) for key in PER_MODALITY}
  out = {}
  for m in names:
    here = f"{where}, modality {m!r}"
    channels = values["num_channels"][m]
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
      raise ValueError(f"{here}: num_channels must be a positive int, got {channels!r}.")
    if values["patch_size"][m] is None and values["plan_path"][m] is None:
      raise ValueError(f"{here}: set patch_size (one for all modalities or a dict modality -> {spatial_dims} ints): "
                       "multimodal examples have a fixed shape per modality (centre crop / pad to it).")
    patch, target = volumes.resolve_geometry(values["patch_size"][m], values["target_spacing_mm"][m],
                                             values["plan_path"][m], spatial_dims, here)
    schemes = volumes.resolve_schemes(values["normalization"][m], None, int(channels), here)
    settings = volumes.Settings(where=here, spatial_dims=spatial_dims, num_channels=int(channels),
                                num_classes=num_classes, segmentation=False, target_spacing_mm=target,
                                crop_nonzero=crop_nonzero, image_order=image_order, schemes=schemes)
    out[m] = (settings, patch, values["intensity_stats"][m])
  return out


def _files(image_dir: str, names: Sequence[str], where: str) -> Dict[str, Dict[str, str]]:
  """{modality: {case: path}} from images/<modality>/; a missing or empty folder raises naming it."""
  direct = io.list_images(image_dir)
  if direct:
    raise ValueError(f"{where}: {image_dir} holds image files directly ({sorted(direct)[:3]}...), but modalities "
                     f"are set: expected {LAYOUT}.")
  found = {}
  for m in names:
    folder = os.path.join(image_dir, m)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"{where}: modality {m!r}: folder {folder} not found. Expected layout: {LAYOUT}.")
    try:
      found[m] = io.list_images(folder)
    except ValueError as e:
      raise ValueError(f"{where}: modality {m!r}: {e}") from None
    if not found[m]:
      raise ValueError(f"{where}: modality {m!r}: no image files in {folder}; fill it or remove {m!r} from "
                       "modalities.")
  return found


def _cases(rows, class_labels, files: Mapping[str, Mapping[str, str]], info: MultimodalInfo, csv_path: str,
           where: str) -> List[MultimodalCase]:
  names = {r["case"] for r in rows}
  for m, by_case in files.items():
    no_row = sorted(set(by_case) - names)
    if no_row:
      raise ValueError(f"{where}: case {no_row[0]!r} (modality {m!r}, {by_case[no_row[0]]}) has no row in "
                       f"{csv_path}; add it or remove the file ({len(no_row)} such file(s) in {m!r}: {no_row[:5]}).")
  cases = []
  for row, label in zip(rows, class_labels):
    name = row["case"]
    have = {m: files[m][name] for m in info.modalities if name in files[m]}
    try:
      check_present({m: float(m in have) for m in info.modalities}, info, name)
    except ValueError as e:
      raise ValueError(f"{where}: {e} Expected {LAYOUT}.") from None
    cases.append(MultimodalCase(name=name, patient_id=row.get("patient_id") or name, class_label=int(label),
                                files=have))
  return cases


def _preprocessor(spec_config: Any, rows, splits: Mapping[str, np.ndarray], csv_path: str,
                  where: str) -> Optional[tabular_lib.TabularPreprocessor]:
  """The tabular statistics fitted on the training split's rows only; None without declared columns."""
  if spec_config is None:
    return None
  spec = tabular_lib.parse_spec(dict(spec_config.items()) if _is_mapping(spec_config) else spec_config)
  if not spec.columns:
    return None
  for column in spec.columns:
    if column in RESERVED:
      raise ValueError(f"{where}: tabular column {column!r} is one of the CSV's reserved columns {RESERVED}"
                       f"{' (the target: a feature that is the label leaks it)' if column == 'label' else ''}.")
    if column not in rows[0]:
      raise ValueError(f"{where}: {csv_path} has no column {column!r} (declared in config.data.tabular); its "
                       f"columns are {list(rows[0])}.")
  train = [rows[i] for i in splits.get("train", ())]
  return tabular_lib.fit(train, spec, [r["case"] for r in train])


def fit_to_shape(image: np.ndarray, shape: Sequence[int]) -> Tuple[np.ndarray, bool]:
  """`image` (*spatial, C) centre-cropped where longer than `shape` and zero-padded where shorter (the extra
  voxel after, as `sampling.pad_to_patch`); returns (image (*shape, C), whether anything was cropped)."""
  crop = tuple(slice((n - p) // 2, (n - p) // 2 + p) if n > p else slice(None) for n, p in zip(image.shape, shape))
  image = image[crop]
  pad = [((p - n) // 2, p - n - (p - n) // 2) if p > n else (0, 0) for n, p in zip(image.shape, shape)]
  cropped = any(c.start is not None for c in crop)
  if any(b or a for b, a in pad):
    image = np.pad(image, pad + [(0, 0)], constant_values=0.0)
  return np.ascontiguousarray(image, np.float32), cropped


class MultimodalFolderSource:
  """Random access to one split's multimodal cases (module doc for the examples). Picklable (no image data).

  `labels()`, `case_name(i)` and `patient_ids()` answer without reading images; `records()` gives the raw CSV
  rows; `preprocessor` is the tabular statistics of the training split (None without tabular columns).
  """

  def __init__(self, split: str, cases: Sequence[MultimodalCase], ids: Sequence[int], modalities: Sequence[Modality],
               rows: Sequence[Mapping[str, str]], preprocessor: Optional[tabular_lib.TabularPreprocessor],
               transformed: Optional[Sequence[Mapping[str, np.ndarray]]], cache_dir: str):
    self.split = split
    self.cases = tuple(cases)
    self.ids = np.asarray(ids, np.int64)
    self.modalities = tuple(modalities)
    self.rows = tuple(rows)
    self.preprocessor = preprocessor
    self._tabular = None if transformed is None else tuple(transformed)  # each case's preprocessed record
    self.cache_dir = cache_dir
    self._warned = set()
    if len(self.ids) != len(self.cases) or len(self.rows) != len(self.cases):
      raise ValueError(f"MultimodalFolderSource: {len(self.ids)} ids and {len(self.rows)} rows for "
                       f"{len(self.cases)} cases.")

  def __len__(self) -> int:
    return len(self.cases)

  def labels(self) -> np.ndarray:
    """(N,) int32 class labels (from the CSV; no image is read)."""
    return np.asarray([c.class_label for c in self.cases], np.int32)

  def patient_ids(self) -> np.ndarray:
    return np.asarray([c.patient_id for c in self.cases], dtype=str)

  def case_name(self, index: int) -> str:
    return self.cases[check_index(index, len(self), self.split)].name

  def records(self) -> Sequence[Mapping[str, str]]:
    return self.rows

  def _image(self, case: MultimodalCase, modality: Modality) -> np.ndarray:
    volume = volumes.Case(name=case.name, image_path=case.files[modality.name])
    c = volumes.load_case(volume, modality.settings, self.cache_dir)
    image, cropped = fit_to_shape(volumes.normalize(c["image"], modality.settings.schemes, modality.stats),
                                  modality.patch_size)
    if cropped and modality.name not in self._warned:
      self._warned.add(modality.name)
      warnings.warn(f"{modality.settings.where}: split {self.split!r}, case {case.name}: preprocessed shape "
                    f"{c['image'].shape[:-1]} is centre-cropped to patch_size {modality.patch_size} (told once "
                    "per split and modality); a larger patch_size or target_spacing_mm keeps the border.",
                    stacklevel=3)
    return image

  def __getitem__(self, index: int) -> Dict[str, Any]:
    i = check_index(index, len(self), self.split)
    case = self.cases[i]
    images, present = {}, {}
    for m in self.modalities:
      has = m.name in case.files
      images[m.name] = (self._image(case, m) if has else
                        np.zeros(m.patch_size + (m.settings.num_channels,), np.float32))
      present[m.name] = np.asarray(float(has), np.float32)
    inputs = {"images": images, "present": present}
    if self._tabular is not None:
      inputs["tabular"] = {k: v.copy() for k, v in self._tabular[i].items()}
    return {"id": np.asarray(self.ids[i], np.int64), "label": np.asarray(case.class_label, np.int32),
            "image": inputs}

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return (f"MultimodalFolderSource(split={self.split!r}, n={len(self)}, "
            f"modalities={[m.name for m in self.modalities]})")


def build(*, root: str, where: str, csv_path: str, rows: Sequence[Mapping[str, str]], class_labels: Sequence[int],
          class_names: Sequence[str], splits: Mapping[str, np.ndarray], modalities: Sequence[str],
          optional_modalities: Sequence[str], tabular: Any, spatial_dims: int, crop_nonzero: bool,
          image_order: int, cache_dir: str, **options) -> Tuple[DatasetInfo, Dict[str, MultimodalFolderSource]]:
  """(info, {split: source}) of a multimodal folder (module doc); image_folder wraps them into its dataset.

  Args:
    root / where: the data folder and the error-message prefix; csv_path / rows / class_labels / class_names /
      splits: the CSV as image_folder read it (rows sorted by case; labels as ints; split -> row indices).
    modalities / optional_modalities / tabular: the multimodal options (module doc).
    options: num_channels, patch_size, target_spacing_mm, plan_path, normalization, intensity_stats, each one
      value for all modalities or a dict modality -> value.
  """
  names, optional = _names(modalities, optional_modalities, where)
  if not rows:
    raise ValueError(f"{where}: {csv_path} lists no case. Expected layout: {LAYOUT}.")
  unknown = sorted(set(options) - set(PER_MODALITY))
  if unknown:
    raise TypeError(f"{where}: unexpected option(s) {unknown}.")
  per = _settings(names, options, spatial_dims=int(spatial_dims), num_classes=len(class_names),
                  crop_nonzero=bool(crop_nonzero), image_order=int(image_order), where=where)
  files = _files(os.path.join(root, "images"), names, where)
  shapes = tuple(per[m][1] for m in names)
  channels = tuple(per[m][0].num_channels for m in names)
  layout = MultimodalInfo(modalities=names, shapes=shapes, channels=channels, may_be_missing=optional)
  cases = _cases(rows, class_labels, files, layout, csv_path, where)
  for m in names:
    volumes.check_files([volumes.Case(c.name, c.files[m]) for c in cases if m in c.files], f"{where}, modality {m!r}",
                        LAYOUT)
  preprocessor = _preprocessor(tabular, rows, splits, csv_path, where)
  # Every record of every split transformed now, before any image is read: a bad value anywhere raises (and an
  # unseen category warns) at build time, not at the first evaluation.
  transformed = {split: None if preprocessor is None else [preprocessor.transform(rows[i], rows[i]["case"])
                                                           for i in ids] for split, ids in splits.items()}
  built = []
  for m in names:
    settings, patch, stats_option = per[m]
    stats = None
    if "ct" in settings.schemes:  # CT statistics of this modality's training images only
      train = [volumes.Case(cases[i].name, cases[i].files[m]) for i in splits.get("train", ()) if m in cases[i].files]
      stats = tuple(volumes.read_intensity_stats(stats_option, settings.num_channels, settings.where)
                    if stats_option is not None else volumes.compute_intensity_stats(train, settings, cache_dir))
    built.append(Modality(name=m, settings=settings, patch_size=patch, stats=stats))
  sources = {split: MultimodalFolderSource(split, [cases[i] for i in ids], ids, built, [rows[i] for i in ids],
                                           preprocessor, transformed[split], cache_dir)
             for split, ids in splits.items()}
  spec = preprocessor.spec if preprocessor is not None else tabular_lib.TabularSpec()
  multimodal = dataclasses.replace(
      layout, numeric=spec.numeric, categorical=spec.categorical,
      categorical_sizes=tuple(preprocessor.cardinalities) if preprocessor is not None else ())
  info = DatasetInfo(task="classification", spatial_dims=int(spatial_dims), image_shape=shapes[0],
                     num_channels=channels[0], num_classes=len(class_names), class_names=tuple(class_names),
                     label_kind="class", multimodal=multimodal)
  return info, sources
