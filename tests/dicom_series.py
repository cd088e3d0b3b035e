"""DICOM CT series written from a volume with pydicom, with the geometry and rescale a scanner gives, for tests."""
from __future__ import annotations

import os

import numpy as np

from trtseg.dicom import pydicom


def write_series(folder: str, volume_zyx: np.ndarray, spacing_zyx, row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 1.0, 0.0),
                 origin=(0.0, 0.0, 0.0), slope: float = 1.0, intercept: float = -1024.0, series_uid: str | None = None,
                 modality: str = "CT", positions=None, shuffle_seed: int | None = 0) -> list[str]:
    """One CT Image Storage file per slice of ``volume_zyx`` (values in HU), stored as int16 (HU - intercept) /
    slope. row_dir / col_dir: ImageOrientationPatient's (LPS) directions of x and y; slices step along their
    normal by spacing_zyx[0] from ``origin``, unless ``positions`` gives each slice's ImagePositionPatient. The
    files are named in shuffled order, as they come from a PACS. Returns their paths."""
    pd = pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    row, col = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row, col)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    stored = np.round((volume_zyx - intercept) / slope).astype(np.int16)
    order = np.random.default_rng(shuffle_seed).permutation(len(stored)) if shuffle_seed is not None else \
        np.arange(len(stored))
    paths = []
    for k, z in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pd.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientID, ds.PatientName = modality, "TEST", "Test^Series"
        ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20260101", 1, int(z) + 1
        # the patient and study attributes a scanner writes (type 2: present, possibly empty)
        ds.PatientBirthDate, ds.PatientSex, ds.StudyTime, ds.StudyID = "", "O", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.Manufacturer = "", "", "test"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        pos = positions[z] if positions is not None else np.asarray(origin, float) + normal * spacing_zyx[0] * z
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.PixelSpacing = [f"{spacing_zyx[1]:.6f}", f"{spacing_zyx[2]:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{spacing_zyx[0]:.6f}"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = stored[z].tobytes()
        path = os.path.join(folder, f"IM{k:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
