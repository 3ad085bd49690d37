"""Turning a DICOM instance or a PNG file into the grey image the NYU pipeline expects.

The models were trained on raw stored values (every stage standardises or thresholds the
image), so we decode, apply the Modality LUT / rescale, and put MONOCHROME1 the right way up
against the full stored range so that the background stays 0; VOI LUT and windowing are
display transforms and are ignored. Orientation: the cancer pipeline expects each image as
acquired (left views facing right, right views facing left, the original's
``horizontal_flip: NO``); an image whose Patient Orientation says it is stored mirrored is
mirrored back, and that is recorded.

Nothing is decoded before its size is known to be bounded: ``read_dicom`` checks the image
attributes against a pixel limit before the pixel data is read, and ``grey_pixels`` has each
compressed frame's own header checked against them (``frames.py``) before a decoder runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from mammonode.exam.orientation import Frame, Orientation, mirrored_per_header, mirrored_per_pixels
from mammonode.pipeline.frames import DEFAULT_MAX_PIXELS, FrameHeaderError, check_pixel_data, check_pixel_limits


class ImageInputError(ValueError):
    """An input image cannot be used (undecodable, not grey-scale, wrong shape, ...)."""

    def __init__(self, message: str, view: str | None = None):
        super().__init__(message)
        self.view = view


@dataclass
class PreparedView:
    view: str
    image: np.ndarray  # float32, in the ACQUIRED frame: L facing right, R facing left
    source: str
    orientation: Orientation
    orientation_source: str  # "patient_orientation", "pixels" or "png"
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def facing_right(self) -> np.ndarray:
        """The image with every view facing right (the frame of the models)."""
        return self.orientation.convert(self.image, Frame.ACQUIRED, Frame.FACING_RIGHT)


def grey_pixels(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decoded pixels with Modality LUT applied and MONOCHROME1 inverted, as float32.
    Refused before decoding when the image, or what a compressed frame's header declares,
    is not what the attributes say or exceeds ``max_pixels``."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ImageInputError("data set has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImageInputError("not a grey-scale image (SamplesPerPixel != 1)")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ImageInputError("multi-frame images are not pipeline inputs")
    try:
        check_pixel_data(ds, max_pixels)
    except FrameHeaderError as exc:
        raise ImageInputError(f"pixel data not decoded: {exc}") from exc
    except Exception as exc:  # pydicom's frame splitting raises on malformed encapsulation
        raise ImageInputError(f"cannot decode pixel data: {type(exc).__name__}: {exc}") from exc
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoders raise many different types
        raise ImageInputError(f"cannot decode pixel data: {exc}") from exc
    if stored.ndim != 2:
        raise ImageInputError(f"unexpected pixel array shape {stored.shape}")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    values = stored.astype(np.float64)
    if photometric == "MONOCHROME1":
        bits = int(ds.get("BitsStored", stored.dtype.itemsize * 8))
        if int(ds.get("PixelRepresentation", 0)) == 0:
            values = (2**bits - 1) - values
        else:
            values = (2 ** (bits - 1) - 1) - values
    elif photometric != "MONOCHROME2":
        raise ImageInputError(f"photometric interpretation {photometric} is not grey-scale")
    if "ModalityLUTSequence" not in ds:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1 or intercept != 0:
            values = values * slope + intercept
    else:
        from pydicom.pixels import apply_modality_lut

        values = apply_modality_lut(values.astype(stored.dtype), ds).astype(np.float64)
    return values.astype(np.float32)


def prepare_dicom(view: str, ds: Dataset, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedView:
    image = grey_pixels(ds, max_pixels)
    mirrored, how = mirrored_per_header(view, ds), "patient_orientation"
    if mirrored is None:
        mirrored, how = mirrored_per_pixels(view, image), "pixels"
    orientation = Orientation(view, mirrored)
    image = np.ascontiguousarray(orientation.convert(image, Frame.STORED, Frame.ACQUIRED))
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return PreparedView(
        view=view,
        image=image,
        source=source,
        orientation=orientation,
        orientation_source=how,
        sop_class_uid=str(ds.get("SOPClassUID", "")) or None,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")) or None,
        study_instance_uid=str(ds.get("StudyInstanceUID", "")) or None,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
    )


def read_dicom(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Dataset:
    """The whole data set; an image beyond ``max_pixels`` is refused from its header, before
    its pixel data (as large as the image when not compressed) is read."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise ImageInputError(f"{path}: not a readable DICOM file: {exc}") from exc
    if "Rows" in header and "Columns" in header:
        try:
            check_pixel_limits(header, max_pixels)
        except FrameHeaderError as exc:
            raise ImageInputError(f"pixel data not read: {exc}") from exc
    try:
        return pydicom.dcmread(path)
    except Exception as exc:
        raise ImageInputError(f"{path}: not a readable DICOM file: {exc}") from exc


def without_pixels(ds: Dataset) -> Dataset:
    """The header alone, for the result objects once the pixels are prepared (a mammogram's
    pixel data is tens of megabytes; the header is what the results copy)."""
    if "PixelData" in ds:
        del ds.PixelData
    return ds


def prepare_png(view: str, path: Path, mirrored: bool = False) -> PreparedView:
    """A grey PNG as acquired (or stored mirrored, when ``mirrored``)."""
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageInputError(f"{path}: not a readable PNG file")
    if pixels.ndim != 2:
        raise ImageInputError(f"{path}: not a grey-scale PNG (shape {pixels.shape})")
    orientation = Orientation(view, mirrored)
    image = np.ascontiguousarray(orientation.convert(pixels.astype(np.float32), Frame.STORED, Frame.ACQUIRED))
    return PreparedView(view=view, image=image, source=str(path), orientation=orientation, orientation_source="png")
