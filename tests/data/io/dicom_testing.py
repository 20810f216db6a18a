"""DICOM files written with pydicom for the tests: classic slices (optionally compressed) and Enhanced multi-frame."""


import numpy as np


def ds_value(value):
  """A decimal string within DICOM's 16-character DS limit."""
  return f"{float(value):.10g}"


def _meta_and_dataset(sop_class, transfer_syntax=None):
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = sop_class
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  return ds


def _set_pixel_module(ds, rows, columns):
  ds.Rows, ds.Columns = rows, columns
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated = ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 0


def write_dicom(path, pixels, *, position=None, orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.7, 0.9),
                slope=2.0, intercept=-1024.0, series_uid="1.2.3.4", drop=(), series_number=None,
                series_description=None, transfer_syntax=None, encapsulated_frames=None):
  """One classic CT slice. transfer_syntax: Deflated is written as such, another compressed syntax is encoded with
  pydicom's `Dataset.compress` unless `encapsulated_frames` (raw bytes per frame) stands in for the encoded data."""
  from pydicom.encaps import encapsulate
  from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian

  ds = _meta_and_dataset(CTImageStorage)
  ds.Modality = "CT"
  ds.SeriesInstanceUID = series_uid
  if series_number is not None:
    ds.SeriesNumber = series_number
  if series_description is not None:
    ds.SeriesDescription = series_description
  _set_pixel_module(ds, *pixels.shape)
  ds.PixelSpacing = [ds_value(s) for s in pixel_spacing]
  if position is not None:
    ds.ImagePositionPatient = [ds_value(p) for p in position]
    ds.ImageOrientationPatient = [ds_value(o) for o in orientation]
    ds.SliceThickness = "1.5"  # thinner than the 3 mm step: a gap, spacing must come from positions
  if slope is not None:
    ds.RescaleSlope = str(slope)
    ds.RescaleIntercept = str(intercept)
  for keyword in drop:
    delattr(ds, keyword)
  ds.PixelData = pixels.astype(np.uint16).tobytes()
  if encapsulated_frames is not None:
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate(list(encapsulated_frames))
  elif transfer_syntax == DeflatedExplicitVRLittleEndian:
    ds.file_meta.TransferSyntaxUID = transfer_syntax
  elif transfer_syntax is not None:
    ds.compress(transfer_syntax)
  ds.save_as(path, enforce_file_format=True)


def write_slices(folder, raw, positions, orientation=(1, 0, 0, 0, 1, 0), **kw):
  """Slice k of `raw` (z, y, x) at positions[k] (LPS mm), files in shuffled order (name != order).

  Returns:
    the file path of each slice k.
  """
  folder.mkdir(exist_ok=True)
  order = np.random.default_rng(3).permutation(raw.shape[0])
  paths = [None] * raw.shape[0]
  for file_index, k in enumerate(order):
    paths[k] = folder / f"IM{file_index:04d}.dcm"
    write_dicom(paths[k], raw[k], position=positions[k], orientation=orientation, **kw)
  return paths


def write_series(folder, raw, orientation=(1, 0, 0, 0, 1, 0), origin=(-50.0, -40.0, 20.0), step=3.0, **kw):
  """Slice k of `raw` (z, y, x) at origin + k * step * normal, files in shuffled order (name != order)."""
  orientation = np.asarray(orientation, np.float64)
  normal = np.cross(orientation[:3], orientation[3:])
  positions = [np.asarray(origin) + k * step * normal for k in range(raw.shape[0])]
  return write_slices(folder, raw, positions, orientation=orientation, **kw)


def write_enhanced_ct(path, frames, positions, *, orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.7, 0.9),
                      slice_thickness=2.0, slopes=None, intercepts=None, shared_rescale=(1.0, 0.0),
                      series_uid="1.2.3.5"):
  """An Enhanced CT file: frames (F, Rows, Columns) stored in that order, frame k at positions[k] (LPS mm).

  Orientation, pixel measures and (without per-frame `slopes`/`intercepts`) the rescale are in the shared
  functional group; positions, and per-frame rescale values when given, in the per-frame groups.
  """
  from pydicom.dataset import Dataset
  from pydicom.sequence import Sequence
  from pydicom.uid import EnhancedCTImageStorage

  def item(**values):
    ds = Dataset()
    for keyword, value in values.items():
      setattr(ds, keyword, value)
    return Sequence([ds])

  def rescale_item(slope, intercept):
    return item(RescaleSlope=ds_value(slope), RescaleIntercept=ds_value(intercept), RescaleType="HU")

  ds = _meta_and_dataset(EnhancedCTImageStorage)
  ds.Modality = "CT"
  ds.SeriesInstanceUID = series_uid
  ds.NumberOfFrames = frames.shape[0]
  _set_pixel_module(ds, *frames.shape[1:])
  shared = Dataset()
  shared.PixelMeasuresSequence = item(PixelSpacing=[ds_value(s) for s in pixel_spacing],
                                      SliceThickness=ds_value(slice_thickness))
  shared.PlaneOrientationSequence = item(ImageOrientationPatient=[ds_value(o) for o in orientation])
  if slopes is None:
    shared.PixelValueTransformationSequence = rescale_item(*shared_rescale)
  ds.SharedFunctionalGroupsSequence = Sequence([shared])
  per_frame = []
  for k, position in enumerate(positions):
    group = Dataset()
    group.PlanePositionSequence = item(ImagePositionPatient=[ds_value(p) for p in position])
    if slopes is not None:
      group.PixelValueTransformationSequence = rescale_item(slopes[k], intercepts[k])
    per_frame.append(group)
  ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
  ds.PixelData = frames.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)
