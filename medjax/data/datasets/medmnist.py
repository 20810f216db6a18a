"""MedMNIST v2 (and MedMNIST+ sizes) from the official local `.npz` files; no download.

MedMNIST v2: Yang et al., "MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image
classification", Scientific Data 10, 41 (2023). Files: https://zenodo.org/records/10519652 (all sizes) or
`pip install medmnist` and its download command; pass the folder holding them as `data_dir`.

File layout (one file per subset and size): `{subset}.npz` at 28 px, `{subset}_{size}.npz` at 64/128/224
(3D subsets: 28 and 64 only). Each holds `{split}_images` uint8, (N, H, W) grayscale / (N, H, W, 3) RGB /
(N, D, H, W) 3D, and `{split}_labels` uint8 (N, 1) ((N, 14) multi-label for ChestMNIST), split in
train / val / test (the official splits).

Examples (dicts of numpy arrays), as the official experiments feed them:
  "image"       float32 (*spatial, C) channels-last in [-1, 1]: (x / 255 - 0.5) / 0.5. Grayscale keeps C = 1;
                `channels=3` repeats it to 3 channels (as the official 2D ResNets do).
  "label"       int32 scalar (binary-class, multi-class, ordinal-regression), int32 (14,) of 0/1 for
                ChestMNIST (multi-label).
  "id"          int64 split_code * 10**9 + index (train 0, val 1, test 2).
  "spacing_mm"  float32 ones (spatial_dims,): MedMNIST images are resized, their physical spacing is lost.

Two (or more) resolutions as image modalities (`sizes=(28, 64)`; issue 24's "two image modalities made from the
same case"): the files of one subset at several sizes hold the same cases in the same order (checked: equal split
lengths and identical label arrays, else ValueError naming both files and the first mismatching index), so each
case becomes a multimodal example (`medjax.data.datasets.multimodal`, `DatasetInfo.multimodal`):
  "image"       {"images": {"px28": float32 (28,)*d + (C,), "px64": float32 (64,)*d + (C,)}, "present":
                {"px28": float32 1.0, "px64": float32 1.0}}: modality "px{size}" per size, in the order of
                `sizes`, each preprocessed as the single image at that size; every modality of every case is
                present (the files hold no missing images) and there is no "tabular" (the files hold no
                clinical metadata). "label", "id" and "spacing_mm" as above (the label is the shared one).

The MedMNIST task type (which `DatasetInfo` does not carry) is `TASKS[subset]` / `task_type(subset)`.
Each file is opened once per `Dataset` and its arrays are loaded lazily on first use and shared by the
three splits (memory-mapped where the zip member is stored uncompressed; the official files are deflated,
so they are decompressed into memory once). The file's MD5 is checked against the official value when we
know it (`KNOWN_MD5`), computed once per (path, mtime, size) in this process.

`MedMNISTBuilder` (imported lazily: `from medjax.data.datasets.medmnist import MedMNISTBuilder`) is a
tensorflow-datasets builder writing array_record files, readable without TensorFlow via
`tfds.data_source()` / `builder.as_data_source()`; see `tfds_sources`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import threading
import zipfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from medjax.data.datasets.base import (DATASETS, ID_STRIDE, SPLIT_CODES, Dataset, DatasetInfo, MultimodalInfo,
                                       check_index)

SPLITS = ("train", "val", "test")
SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)
DOWNLOAD_HINT = ("download it from https://zenodo.org/records/10519652 (MedMNIST v2 / MedMNIST+ official "
                 "files; or `pip install medmnist` and its download command) and pass the folder holding it "
                 "as data_dir")

BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL = "binary-class", "multi-class", "multi-label", "ordinal-regression"


@dataclasses.dataclass(frozen=True)
class SubsetInfo:
  """Static facts of one MedMNIST subset (from the MedMNIST v2 paper and the official INFO table).

  Attributes:
    name: subset flag, e.g. "breastmnist".
    task: BINARY, MULTI_CLASS, MULTI_LABEL (ChestMNIST; the official INFO writes "multi-label,
      binary-class") or ORDINAL (RetinaMNIST, labelled as classes 0..4).
    class_names: label names by index (for MULTI_LABEL: one per label column).
    num_channels: 1 (grayscale) or 3 (RGB) as stored in the file.
    spatial_dims: 2 or 3.
    split_sizes: official number of examples per split (train, val, test).
  """
  name: str
  task: str
  class_names: Tuple[str, ...]
  num_channels: int
  spatial_dims: int
  split_sizes: Tuple[int, int, int]

  @property
  def sizes(self) -> Tuple[int, ...]:
    return SIZES_3D if self.spatial_dims == 3 else SIZES_2D


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
           "lung-left", "lung-right", "pancreas", "spleen")

_SUBSETS = (
    SubsetInfo("pathmnist", MULTI_CLASS, (
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
        "cancer-associated stroma", "colorectal adenocarcinoma epithelium"), 3, 2, (89996, 10004, 7180)),
    SubsetInfo("chestmnist", MULTI_LABEL, (
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
        "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"), 1, 2,
               (78468, 11219, 22433)),
    SubsetInfo("dermamnist", MULTI_CLASS, (
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
        "vascular lesions"), 3, 2, (7007, 1003, 2005)),
    SubsetInfo("octmnist", MULTI_CLASS, (
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal"), 1, 2,
               (97477, 10832, 1000)),
    SubsetInfo("pneumoniamnist", BINARY, ("normal", "pneumonia"), 1, 2, (4708, 524, 624)),
    SubsetInfo("retinamnist", ORDINAL, tuple(f"level {i}" for i in range(5)), 3, 2, (1080, 120, 400)),
    SubsetInfo("breastmnist", BINARY, ("malignant", "normal, benign"), 1, 2, (546, 78, 156)),
    SubsetInfo("bloodmnist", MULTI_CLASS, (
        "basophil", "eosinophil", "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
        "neutrophil", "platelet"), 3, 2, (11959, 1712, 3421)),
    SubsetInfo("tissuemnist", MULTI_CLASS, (
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
        "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
        "Thick Ascending Limb"), 1, 2, (165466, 23640, 47280)),
    SubsetInfo("organamnist", MULTI_CLASS, _ORGANS, 1, 2, (34581, 6491, 17778)),
    SubsetInfo("organcmnist", MULTI_CLASS, _ORGANS, 1, 2, (13000, 2392, 8268)),
    SubsetInfo("organsmnist", MULTI_CLASS, _ORGANS, 1, 2, (13940, 2452, 8829)),
    SubsetInfo("organmnist3d", MULTI_CLASS, _ORGANS, 1, 3, (971, 161, 610)),
    SubsetInfo("nodulemnist3d", BINARY, ("benign", "malignant"), 1, 3, (1158, 165, 310)),
    SubsetInfo("adrenalmnist3d", BINARY, ("normal", "hyperplasia"), 1, 3, (1188, 98, 298)),
    SubsetInfo("fracturemnist3d", MULTI_CLASS, (
        "buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"), 1, 3, (1027, 103, 240)),
    SubsetInfo("vesselmnist3d", BINARY, ("vessel", "aneurysm"), 1, 3, (1335, 192, 382)),
    SubsetInfo("synapsemnist3d", BINARY, ("inhibitory synapse", "excitatory synapse"), 1, 3,
               (1230, 177, 352)),
)
SUBSETS: Mapping[str, SubsetInfo] = {s.name: s for s in _SUBSETS}
TASKS: Mapping[str, str] = {s.name: s.task for s in _SUBSETS}

# Official MD5s of the files we hold and have verified; any other file is not checked (verify_md5 means
# "check when known").
KNOWN_MD5: Mapping[str, str] = {
    "breastmnist.npz": "750601b1f35ba3300ea97c75c52ff8f6",
    "pneumoniamnist.npz": "28209eda62fecd6e6a2d98b1501bb15f",
    "adrenalmnist3d.npz": "bbd3c5a5576322bc4cdfea780653b1ce",
    "adrenalmnist3d_64.npz": "17721accfe9fb005146a47d33bc54b2f",
}


def subset_info(subset: str) -> SubsetInfo:
  """The `SubsetInfo` of `subset`; an unknown name raises ValueError with a did-you-mean."""
  try:
    return SUBSETS[subset]
  except (KeyError, TypeError):
    close = difflib.get_close_matches(str(subset), list(SUBSETS), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"dataset 'medmnist': unknown subset {subset!r}.{hint} Known subsets: "
                     f"{', '.join(SUBSETS)}.") from None


def task_type(subset: str) -> str:
  """MedMNIST task of `subset`: "binary-class", "multi-class", "multi-label" or "ordinal-regression"."""
  return subset_info(subset).task


def file_name(subset: str, size: int = 28) -> str:
  """Official file name: "{subset}.npz" at 28 px, "{subset}_{size}.npz" otherwise."""
  info = subset_info(subset)
  if size not in info.sizes or isinstance(size, bool):
    raise ValueError(f"dataset 'medmnist': size for {subset!r} must be one of {info.sizes}, got {size!r}.")
  return f"{subset}.npz" if size == 28 else f"{subset}_{size}.npz"


# ------------------------------------------------------------------------------------------------- MD5

_MD5_CACHE: Dict[Tuple[str, int, int], str] = {}
_MD5_LOCK = threading.Lock()


def file_md5(path: str) -> str:
  """Hex MD5 of the file at `path`, cached per (real path, mtime_ns, size) so a rebuild does not re-hash."""
  real = os.path.realpath(path)
  st = os.stat(real)
  key = (real, st.st_mtime_ns, st.st_size)
  with _MD5_LOCK:
    if key in _MD5_CACHE:
      return _MD5_CACHE[key]
  digest = hashlib.md5()
  with open(real, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  value = digest.hexdigest()
  with _MD5_LOCK:
    _MD5_CACHE[key] = value
  return value


def verify_file_md5(path: str) -> Optional[str]:
  """Checks `path` against KNOWN_MD5 by its base name; returns the MD5 checked, or None if none is known.

  Raises ValueError naming the file, the expected and the actual MD5 on a mismatch.
  """
  expected = KNOWN_MD5.get(os.path.basename(path))
  if expected is None:
    return None
  actual = file_md5(path)
  if actual != expected:
    raise ValueError(f"MedMNIST file {path} has MD5 {actual}, expected the official {expected}: the file is "
                     "corrupt or not the official one; re-download it (or pass verify_md5=False for a "
                     "deliberately modified file).")
  return actual


# ------------------------------------------------------------------------------------------- npz reading


def _npy_member_header(zf: zipfile.ZipFile, member: str) -> Tuple[Tuple[int, ...], np.dtype, bool, int]:
  """(shape, dtype, fortran_order, header_length) of the .npy `member`, reading only its header."""
  with zf.open(member) as f:
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                             else np.lib.format.read_array_header_2_0(f))
    return tuple(shape), dtype, fortran, f.tell()


class NpzArrays:
  """One `.npz` file whose arrays load lazily, once, and are shared by every source holding this object.

  A member stored uncompressed (np.savez) is memory-mapped in place; a deflated one (np.savez_compressed,
  as the official files) is decompressed into memory on first use. Pickling (to a worker process) drops the
  loaded arrays; the receiver reloads on demand.
  """

  def __init__(self, path: str):
    self.path = path
    self._arrays: Dict[str, np.ndarray] = {}
    self._lock = threading.Lock()
    with zipfile.ZipFile(path) as zf:
      self.headers = {}
      for info in zf.infolist():
        if info.filename.endswith(".npy"):
          shape, dtype, fortran, _ = _npy_member_header(zf, info.filename)
          self.headers[info.filename[:-4]] = (shape, dtype)

  def shape(self, key: str) -> Tuple[int, ...]:
    return self.headers[key][0]

  def dtype(self, key: str) -> np.dtype:
    return self.headers[key][1]

  def __contains__(self, key: str) -> bool:
    return key in self.headers

  def get(self, key: str) -> np.ndarray:
    array = self._arrays.get(key)
    if array is None:
      with self._lock:
        array = self._arrays.get(key)
        if array is None:
          array = self._load(key)
          self._arrays[key] = array
    return array

  def _load(self, key: str) -> np.ndarray:
    member = key + ".npy"
    with zipfile.ZipFile(self.path) as zf:
      info = zf.getinfo(member)
      shape, dtype, fortran, header_len = _npy_member_header(zf, member)
      if info.compress_type == zipfile.ZIP_STORED and not dtype.hasobject:
        # The member's bytes sit verbatim in the file after its local header (30 fixed bytes + name + extra).
        with open(self.path, "rb") as f:
          f.seek(info.header_offset)
          local = f.read(30)
          name_len = int.from_bytes(local[26:28], "little")
          extra_len = int.from_bytes(local[28:30], "little")
        offset = info.header_offset + 30 + name_len + extra_len + header_len
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape,
                         order="F" if fortran else "C")
      with zf.open(member) as f:
        return np.lib.format.read_array(f, allow_pickle=False)

  def __getstate__(self):
    return {"path": self.path, "headers": self.headers}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._arrays = {}
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"NpzArrays({self.path!r})"


def _check_file(arrays: NpzArrays, info: SubsetInfo, size: int) -> Dict[str, int]:
  """Validates keys, dtypes and shapes from the headers (no data read); returns {split: N}."""
  path = arrays.path
  image_shape = (size,) * info.spatial_dims + ((3,) if info.num_channels == 3 else ())
  label_width = len(info.class_names) if info.task == MULTI_LABEL else 1
  lengths = {}
  for split in SPLITS:
    for key in (f"{split}_images", f"{split}_labels"):
      if key not in arrays:
        raise ValueError(f"MedMNIST file {path} has no array {key!r} (arrays: {sorted(arrays.headers)}); "
                         f"expected {', '.join(f'{s}_images, {s}_labels' for s in SPLITS)}.")
    images, labels = arrays.shape(f"{split}_images"), arrays.shape(f"{split}_labels")
    if images[1:] != image_shape or arrays.dtype(f"{split}_images") != np.uint8:
      raise ValueError(f"MedMNIST file {path}: {split}_images is {arrays.dtype(f'{split}_images')} "
                       f"{images}, expected uint8 (N, {', '.join(map(str, image_shape))}) for {info.name} at "
                       f"size {size}.")
    if labels not in ((images[0], label_width),) + (((images[0],),) if label_width == 1 else ()) or \
        arrays.dtype(f"{split}_labels").kind not in "iu":
      raise ValueError(f"MedMNIST file {path}: {split}_labels is {arrays.dtype(f'{split}_labels')} {labels}, "
                       f"expected integers ({images[0]}, {label_width}) to match {split}_images {images}.")
    if images[0] >= ID_STRIDE:
      raise ValueError(f"MedMNIST file {path}: {split} has {images[0]} examples, at most {ID_STRIDE - 1}.")
    lengths[split] = images[0]
  return lengths


class MedMNISTSource:
  """Random access to one split of a MedMNIST file (see the module doc for the example format)."""

  def __init__(self, arrays: NpzArrays, split: str, info: SubsetInfo, channels: int, length: int,
               label_order: Optional[np.ndarray] = None):
    self.arrays = arrays
    self.label_order = label_order
    self.split = split
    self.split_code = SPLIT_CODES[split]
    self.info = info
    self.channels = channels
    self.length = int(length)
    self._labels = None

  def __len__(self) -> int:
    return self.length

  def labels(self) -> np.ndarray:
    """All labels of the split: int32 (N,), or (N, 14) for multi-label; validated and cached on first use."""
    if self._labels is None:
      labels = self.arrays.get(f"{self.split}_labels")
      labels = labels.reshape(len(labels), -1) if self.info.task == MULTI_LABEL else labels.reshape(-1)
      limit = 2 if self.info.task == MULTI_LABEL else len(self.info.class_names)
      bad = (labels < 0) | (labels >= limit)
      if bad.any():
        i = int(np.argwhere(bad)[0][0])
        raise ValueError(f"MedMNIST file {self.arrays.path}: {self.split}_labels[{i}] = {labels[i].tolist()} "
                         f"is outside [0, {limit}) for {self.info.name}.")
      labels = labels.astype(np.int32)
      if self.label_order is not None:
        labels = labels[self.label_order]
      labels.setflags(write=False)  # shared by every example; a caller must not edit it in place
      self._labels = labels
    return self._labels

  # Ship no loaded data to a worker process; it reloads lazily.
  def __getstate__(self):
    state = dict(self.__dict__)
    state["_labels"] = None
    return state

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    i = check_index(index, self.length, self.split)
    raw = np.asarray(self.arrays.get(f"{self.split}_images")[i])
    # (x / 255 - 0.5) / 0.5 of the official transforms, computed in float32.
    image = raw.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    if self.info.num_channels == 1:
      image = image[..., None]
      if self.channels == 3:
        image = np.repeat(image, 3, axis=-1)
    return {
        "image": image,
        "label": np.array(self.labels()[i], dtype=np.int32),
        "id": np.asarray(self.split_code * ID_STRIDE + i, dtype=np.int64),
        "spacing_mm": np.ones(self.info.spatial_dims, np.float32),
    }

  def __iter__(self):
    for i in range(self.length):
      yield self[i]

  def __repr__(self) -> str:
    return f"MedMNISTSource({self.info.name!r}, split={self.split!r}, n={self.length}, {self.arrays.path!r})"


def find_file(subset: str, size: int, data_dir: str) -> str:
  """Path of the official file of (subset, size) in `data_dir`; FileNotFoundError naming it if absent."""
  name = file_name(subset, size)
  path = os.path.join(os.path.expanduser(str(data_dir)), name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"MedMNIST file for subset {subset!r} at size {size} not found: expected {path} "
                            f"(data_dir={data_dir!r}). To get it, {DOWNLOAD_HINT}.")
  return path


def modality_name(size: int) -> str:
  """Name of the image modality at `size` px in a multi-resolution set (`medmnist(sizes=...)`): "px{size}"."""
  return f"px{int(size)}"


class MultiSizeSource:
  """One split of a multi-resolution set: the same case from one `MedMNISTSource` per size, as one multimodal
  example (module doc). `sources` maps modality name -> source, in the order the modalities are declared."""

  def __init__(self, sources: Mapping[str, MedMNISTSource]):
    self.sources = dict(sources)
    first = next(iter(self.sources.values()))
    self.split, self.length = first.split, len(first)

  def __len__(self) -> int:
    return self.length

  def labels(self) -> np.ndarray:
    """All labels of the split (identical in every file: checked when the set was built); see
    `MedMNISTSource.labels`."""
    return next(iter(self.sources.values())).labels()

  def __getitem__(self, index: int) -> Dict[str, Any]:
    i = check_index(index, self.length, self.split)
    examples = {name: source[i] for name, source in self.sources.items()}
    first = next(iter(examples.values()))
    return {
        "image": {"images": {name: ex["image"] for name, ex in examples.items()},
                  # Every case has every resolution: the files hold no missing images.
                  "present": {name: np.asarray(1.0, np.float32) for name in examples}},
        "label": first["label"], "id": first["id"], "spacing_mm": first["spacing_mm"],
    }

  def __iter__(self):
    for i in range(self.length):
      yield self[i]

  def __repr__(self) -> str:
    first = next(iter(self.sources.values()))
    return (f"MultiSizeSource({first.info.name!r}, split={self.split!r}, n={self.length}, "
            f"{[s.arrays.path for s in self.sources.values()]})")


def _open_file(info: SubsetInfo, size: int, data_dir: str, verify_md5: bool) -> Tuple[NpzArrays, Dict[str, int]]:
  """The checked `NpzArrays` of (subset, size) and its split lengths; headers only, no array data read."""
  path = find_file(info.name, size, data_dir)
  if verify_md5:
    verify_file_md5(path)
  try:
    arrays = NpzArrays(path)
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    raise ValueError(f"MedMNIST file {path} is not a readable .npz: {e}") from e
  return arrays, _check_file(arrays, info, size)


def check_same_cases(first: NpzArrays, other: NpzArrays) -> None:
  """Raises ValueError naming both files, the split and the first mismatching index unless `first` and `other`
  (two sizes of one subset) have the same split lengths and identical label arrays in every split: the evidence
  available without reading images that they hold the same cases in the same order. Reads the label arrays
  only."""
  for split in SPLITS:
    key = f"{split}_labels"
    a, b = first.get(key), other.get(key)
    # (N, 1) and (N,) hold the same labels; the width is the subset's (`_check_file`), so the shapes agree.
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.any(a[:n] != b[:n], axis=1))
    name_a, name_b = os.path.basename(first.path), os.path.basename(other.path)
    if differ.size:
      i = int(differ[0])
      detail = f"{key}[{i}] is {a[i].tolist()} in {name_a} and {b[i].tolist()} in {name_b}"
    elif len(a) != len(b):
      i = n
      detail = f"{split} has {len(a)} cases in {name_a} and {len(b)} in {name_b}"
    else:
      continue
    raise ValueError(f"MedMNIST files {first.path} and {other.path} do not hold the same cases in the same order "
                     f"(first mismatching {split} index {i}: {detail}); use files of one MedMNIST release.")


@DATASETS.register("medmnist")
def medmnist(*, subset: str, data_dir: str, size: int = 28, channels: Optional[int] = None,
             verify_md5: bool = True, permute_train_labels: Optional[int] = None,
             sizes: Optional[Sequence[int]] = None) -> Dataset:
  """A MedMNIST subset from its official `.npz` in `data_dir` (module doc), with train/val/test sources.

  Args:
    subset: one of SUBSETS, e.g. "breastmnist", "chestmnist", "organmnist3d".
    data_dir: folder holding the official files (never downloaded).
    size: image side in px: 28, 64, 128, 224 (2D) or 28, 64 (3D).
    channels: None (as stored: 1 grayscale, 3 RGB) or 3 (grayscale repeated to RGB; RGB unchanged);
      1 is accepted for grayscale subsets only.
    verify_md5: check the file against the official MD5 when it is known (KNOWN_MD5); False skips it.
    permute_train_labels: None, or a seed: the train split's labels are randomly permuted over its images
      (class counts kept, the image-label link destroyed; val and test untouched), for the data
      randomisation sanity check of saliency maps (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").
    sizes: None (one image per example, at `size`), or distinct sizes, e.g. (28, 64): multimodal examples with
      one image modality "px{size}" per size (module doc; `modality_name`), read from one file per size;
      `info.image_shape` / `num_channels` are those of sizes[0], and `size` must then be left at its default
      or equal sizes[0]. One size gives a one-modality set (a single-resolution baseline for fusion models).

  Raises FileNotFoundError (expected path and where to get it) for a missing file, ValueError for a bad
  argument, an MD5 mismatch, a file whose arrays do not have the official layout, or files of several sizes
  that do not hold the same cases in the same order.
  """
  info = subset_info(subset)
  if sizes is not None:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes or \
        len(set(sizes)) != len(sizes):
      raise ValueError(f"dataset 'medmnist': sizes must be None or a non-empty sequence of distinct sizes from "
                       f"{info.sizes} for {subset!r}, got {sizes!r}.")
    if size not in (28, sizes[0]):
      raise ValueError(f"dataset 'medmnist': size={size!r} and sizes={tuple(sizes)!r} disagree; with sizes, leave "
                       f"size at its default (the first modality's size is sizes[0]).")
  all_sizes = tuple(sizes) if sizes is not None else (size,)
  for each in all_sizes:
    if not isinstance(each, (int, np.integer)) or isinstance(each, bool) or each not in info.sizes:
      what = "sizes" if sizes is not None else "size"
      raise ValueError(f"dataset 'medmnist': {what} for {subset!r} must be one of {info.sizes}, got {each!r}.")
  all_sizes = tuple(int(s) for s in all_sizes)
  if channels not in (None, 1, 3) or isinstance(channels, bool) or (channels == 1 and info.num_channels == 3):
    raise ValueError(f"dataset 'medmnist': channels must be None or 3 (or 1 for a grayscale subset); "
                     f"{subset!r} has {info.num_channels}, got {channels!r}.")
  channels = info.num_channels if channels is None else max(int(channels), info.num_channels)
  opened = [_open_file(info, s, data_dir, verify_md5) for s in all_sizes]
  arrays, lengths = opened[0]
  for other, _ in opened[1:]:
    check_same_cases(arrays, other)
  if permute_train_labels is not None and (isinstance(permute_train_labels, bool)
                                           or not isinstance(permute_train_labels, (int, np.integer))):
    raise ValueError(f"dataset 'medmnist': permute_train_labels must be None or an integer seed, "
                     f"got {permute_train_labels!r}.")
  orders = dict.fromkeys(SPLITS)
  if permute_train_labels is not None:
    orders["train"] = np.random.default_rng(int(permute_train_labels)).permutation(lengths["train"])
  dims = info.spatial_dims
  multimodal = None
  if sizes is None:
    sources = {split: MedMNISTSource(arrays, split, info, channels, lengths[split], orders[split])
               for split in SPLITS}
  else:
    names = tuple(modality_name(s) for s in all_sizes)
    # The same permutation for every size: it permutes the (shared) labels, the images stay where they are.
    sources = {split: MultiSizeSource({name: MedMNISTSource(a, split, info, channels, lengths[split], orders[split])
                                       for name, (a, _) in zip(names, opened)})
               for split in SPLITS}
    multimodal = MultimodalInfo(modalities=names, shapes=tuple((s,) * dims for s in all_sizes),
                                channels=(channels,) * len(names))
  dataset_info = DatasetInfo(task="classification", spatial_dims=dims, image_shape=(all_sizes[0],) * dims,
                             num_channels=channels, num_classes=len(info.class_names), class_names=info.class_names,
                             label_kind="class", multimodal=multimodal)
  return Dataset(info=dataset_info, sources=sources)


# ------------------------------------------------------------------------------------------------- TFDS


def _make_builder_class():
  """Defines MedMNISTBuilder on first use, so importing this module does not import tensorflow_datasets."""
  import tensorflow_datasets as tfds

  configs = [tfds.core.BuilderConfig(name=f"{s.name}_{n}", description=f"{s.name} at {n} px ({s.task})")
             for s in _SUBSETS for n in s.sizes]

  class MedMNISTBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of every MedMNIST subset and size (config "{subset}_{size}") from the local `.npz`.

    Build with `file_format="array_record"` so that neither building nor reading needs TensorFlow:

      b = MedMNISTBuilder(config="breastmnist_28", data_dir=tfds_dir, file_format="array_record")
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=npz_dir))
      src = b.as_data_source()["train"]   # or tfds.data_source("medmnist/breastmnist_28", data_dir=...)

    Records hold the raw uint8 image as stored, "label" int64 (scalar, or (14,) for ChestMNIST) and "id"
    int64 (split_code * 10**9 + index): records are stored in key-hash order, so the id is the only link to
    the file's order. `tfds_sources` wraps them into the same examples as the "medmnist" dataset.
    """
    name = "medmnist"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "MedMNIST v2 / MedMNIST+ official npz files."}
    BUILDER_CONFIGS = configs
    verify_md5 = True  # set False on an instance to build from a deliberately modified file
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put the official MedMNIST .npz files in the manual dir: {DOWNLOAD_HINT}."

    def _subset(self) -> Tuple[SubsetInfo, int]:
      subset, size = self.builder_config.name.rsplit("_", 1)
      return SUBSETS[subset], int(size)

    def _info(self):
      info, size = self._subset()
      image_shape = (size,) * info.spatial_dims + (info.num_channels,)
      label_shape = (len(info.class_names),) if info.task == MULTI_LABEL else ()
      return tfds.core.DatasetInfo(
          builder=self,
          description="MedMNIST v2 (Yang et al., Scientific Data 2023), official splits.",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=image_shape, dtype=np.uint8),
              "label": tfds.features.Tensor(shape=label_shape, dtype=np.int64),
              "id": tfds.features.Scalar(dtype=np.int64),
          }),
          citation="Yang et al., MedMNIST v2, Scientific Data 10, 41 (2023).",
          homepage="https://medmnist.com/")

    def _split_generators(self, dl_manager):
      info, size = self._subset()
      path = find_file(info.name, size, os.fspath(dl_manager.manual_dir))
      if self.verify_md5:
        verify_file_md5(path)
      arrays = NpzArrays(path)
      lengths = _check_file(arrays, info, size)
      return {split: self._generate_examples(arrays, info, split, lengths[split]) for split in SPLITS}

    def _generate_examples(self, arrays, info, split, length):
      images = arrays.get(f"{split}_images")
      labels = arrays.get(f"{split}_labels")
      code = SPLIT_CODES[split]
      for i in range(length):
        image = images[i] if info.num_channels == 3 else images[i][..., None]
        label = labels[i].astype(np.int64) if info.task == MULTI_LABEL else np.int64(labels[i].reshape(-1)[0])
        yield i, {"image": np.asarray(image), "label": label, "id": np.int64(code * ID_STRIDE + i)}

  return MedMNISTBuilder


_BUILDER = None


def __getattr__(name: str) -> Any:
  global _BUILDER
  if name == "MedMNISTBuilder":
    if _BUILDER is None:
      _BUILDER = _make_builder_class()
    return _BUILDER
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TfdsSource:
  """Wraps a TFDS array_record data source of MedMNISTBuilder into "medmnist" examples.

  Index i is the i-th record in TFDS storage (key-hash) order; the example's "id" is the original one.
  """

  def __init__(self, source, info: SubsetInfo, channels: int):
    self.source, self.info, self.channels = source, info, channels

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    record = self.source[check_index(index, len(self), "tfds")]
    image = np.asarray(record["image"]).astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    if image.shape[-1] == 1 and self.channels == 3:
      image = np.repeat(image, 3, axis=-1)
    return {"image": image, "label": np.asarray(record["label"], np.int32),
            "id": np.asarray(record["id"], np.int64), "spacing_mm": np.ones(self.info.spatial_dims, np.float32)}


def tfds_sources(*, subset: str, data_dir: str, tfds_dir: str, size: int = 28,
                 channels: Optional[int] = None, verify_md5: bool = True) -> Dataset:
  """Builds (once) the array_record TFDS dataset of (subset, size) in `tfds_dir` and returns it as a Dataset.

  `data_dir` holds the official .npz (the builder's manual dir). Needs tensorflow_datasets and array_record,
  not TensorFlow. Examples equal those of `medmnist(...)` with the same id (in another order).
  """
  import tensorflow_datasets as tfds
  base = medmnist(subset=subset, data_dir=data_dir, size=size, channels=channels,
                  verify_md5=verify_md5)
  builder_cls = __getattr__("MedMNISTBuilder")
  builder = builder_cls(config=f"{subset}_{int(size)}", data_dir=os.fspath(tfds_dir),
                        file_format="array_record")
  builder.verify_md5 = verify_md5
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(str(data_dir))))
  sources = builder.as_data_source()
  info = SUBSETS[subset]
  return Dataset(info=base.info, sources={split: TfdsSource(sources[split], info, base.info.num_channels)
                                          for split in SPLITS})
