"""DICOM files written with pydicom for the tests."""


import numpy as np


def ds_value(value):
  """A decimal string within DICOM's 16-character DS limit."""
  return f"{float(value):.10g}"


def write_dicom(path, pixels, *, position=None, orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.7, 0.9),
                 slope=2.0, intercept=-1024.0, series_uid="1.2.3.4", drop=()):
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CTImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = CTImageStorage
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "CT"
  ds.SeriesInstanceUID = series_uid
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated = ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 0
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
  ds.save_as(path, enforce_file_format=True)


def write_series(folder, raw, orientation=(1, 0, 0, 0, 1, 0), origin=(-50.0, -40.0, 20.0), step=3.0, **kw):
  """Slice k of `raw` (z, y, x) at origin + k * step * normal, files in shuffled order (name != order)."""
  folder.mkdir(exist_ok=True)
  orientation = np.asarray(orientation, np.float64)
  normal = np.cross(orientation[:3], orientation[3:])
  order = np.random.default_rng(3).permutation(raw.shape[0])
  for file_index, k in enumerate(order):
    position = np.asarray(origin) + k * step * normal
    write_dicom(folder / f"IM{file_index:04d}.dcm", raw[k], position=position, orientation=orientation, **kw)
