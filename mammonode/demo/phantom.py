"""A synthetic four-view screening exam (breast phantom) as MG DICOM instances.

Used by ``mammonode demo`` when the project's shared sample mammograms are not available,
so that the demo runs from a fresh clone. The images are smooth half-ellipses with texture
and noise, oriented as acquired (left views facing right), with the header attributes a
mammography unit sends. They are not mammograms and no result on them means anything.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mammonode.exam.assignment import MG_FOR_PRESENTATION
from mammonode.exam.views import VIEWS

VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
ORIENTATION = {"L-CC": ["A", "R"], "R-CC": ["P", "L"], "L-MLO": ["A", "FR"], "R-MLO": ["P", "FL"]}


def breast_image(view: str, shape: tuple[int, int] = (2600, 2000), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + VIEWS.index(view))
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, ry = rows * (0.48 if view.endswith("CC") else 0.42), rows * (0.42 if view.endswith("CC") else 0.5)
    rx = cols * 0.62
    inside = ((y - cy) / ry) ** 2 + (x / rx) ** 2 <= 1.0
    texture = rng.normal(0, 1, (rows // 16 + 1, cols // 16 + 1)).astype(np.float32)
    texture = np.kron(texture, np.ones((16, 16), dtype=np.float32))[:rows, :cols]
    depth = np.clip(1.0 - np.sqrt(((y - cy) / ry) ** 2 + (x / rx) ** 2), 0, 1)
    image = 1400 + 1800 * depth + 180 * texture + rng.normal(0, 30, shape).astype(np.float32)
    if view.endswith("MLO"):
        image[: rows // 3, : cols // 6] += 700  # pectoral muscle
    image = np.where(inside, image, 0)
    image = np.clip(image, 0, 4095).astype(np.uint16)
    return image if view.startswith("L") else np.ascontiguousarray(image[:, ::-1])


def exam_datasets(
    patient_name: str = "PHANTOM^DEMO",
    patient_id: str = "PHANTOM01",
    shape: tuple[int, int] = (2600, 2000),
    study_uid: str | None = None,
) -> list[Dataset]:
    study_uid = study_uid or generate_uid()
    today = dt.date.today().strftime("%Y%m%d")
    out = []
    for number, view in enumerate(VIEWS, start=1):
        lat, position = view.split("-")
        pixels = breast_image(view, shape)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
        sop_uid = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MG_FOR_PRESENTATION
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "100000"
        ds.AccessionNumber = "PHANTOM"
        ds.Modality = "MG"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.Manufacturer = "mammonode phantom"
        ds.ReferringPhysicianName = ""
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.StudyID = "1"
        ds.SeriesNumber = number
        ds.InstanceNumber = 1
        ds.PatientOrientation = ORIENTATION[view]
        ds.ImageLaterality = lat
        ds.ViewPosition = position
        ds.BodyPartExamined = "BREAST"
        ds.BurnedInAnnotation = "NO"
        ds.PixelSpacing = [0.07, 0.07]
        ds.ImagerPixelSpacing = [0.07, 0.07]
        code, meaning = VIEW_CODES[position]
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "SCT", meaning
        item.ViewModifierCodeSequence = Sequence([])
        ds.ViewCodeSequence = Sequence([item])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


def write_exam(directory: Path, **kwargs) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in exam_datasets(**kwargs):
        view = f"{ds.ImageLaterality}-{ds.ViewPosition}"
        path = directory / f"{view}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
