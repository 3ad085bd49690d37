"""Compressed transfer syntaxes decode to the pixels they were made from."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
import pytest
from support.paths import SHARED, need_shared

from mammonode.pipeline.images import grey_pixels

PAIRS = [
    ("nyu1-cc", "L-CC", "1_L_CC"),
    ("nyu1-cc", "R-CC", "1_R_CC"),
    ("nyu2-cc", "L-CC", "2_L_CC"),
    ("nyu2-cc", "R-CC", "2_R_CC"),
]


@pytest.mark.parametrize(("exam", "view", "png"), PAIRS)
def test_jpeg2000_samples_decode_to_the_png_pixels(exam, view, png):
    import cv2

    ds = pydicom.dcmread(need_shared("samples", "dicom", exam, f"{view}.dcm"))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 Image Compression (Lossless Only)
    source = cv2.imread(str(need_shared("samples", "png", "nyu", f"{png}.png")), cv2.IMREAD_UNCHANGED)
    # The PNGs hold 12-bit values x16; the instances store the 12-bit values.
    assert np.array_equal(ds.pixel_array, source // 16)
    assert np.array_equal(grey_pixels(ds), (source // 16).astype(np.float32))


@pytest.mark.parametrize("syntax", ["jpegls-lossless", "rle", "deflate", "implicit"])
def test_other_lossless_syntaxes_decode_identically(tmp_path, syntax):
    tool = need_shared("tools", "mgdicom.py")
    png = need_shared("samples", "png", "nyu", "1_L_CC.png")
    subprocess.run(
        [sys.executable, str(tool), str(tmp_path), "--view", f"L-CC={png}", "--transfer-syntax", syntax],
        check=True,
        capture_output=True,
    )
    ds = pydicom.dcmread(tmp_path / "L-CC.dcm")
    reference = pydicom.dcmread(SHARED / "samples" / "dicom" / "nyu1-cc" / "L-CC.dcm")
    assert np.array_equal(ds.pixel_array, reference.pixel_array)


def test_monochrome1_and_mirrored_storage_prepare_like_the_original(tmp_path):
    from mammonode.pipeline.inputs import prepare_exam

    tool = need_shared("tools", "mgdicom.py")
    png = need_shared("samples", "png", "nyu", "1_R_CC.png")
    plain, variant = tmp_path / "plain", tmp_path / "variant"
    subprocess.run([sys.executable, str(tool), str(plain), "--view", f"R-CC={png}"], check=True, capture_output=True)
    subprocess.run(
        [sys.executable, str(tool), str(variant), "--view", f"R-CC={png}", "--monochrome1", "--mirror", "R-CC"],
        check=True,
        capture_output=True,
    )
    a, _ = prepare_exam([plain / "R-CC.dcm"])
    b, _ = prepare_exam([variant / "R-CC.dcm"])
    assert b["R-CC"].orientation.mirrored is True and a["R-CC"].orientation.mirrored is False
    # MONOCHROME1 inverted against 2^BitsStored - 1 gives back the MONOCHROME2 values, background 0.
    assert np.array_equal(a["R-CC"].image, b["R-CC"].image)
