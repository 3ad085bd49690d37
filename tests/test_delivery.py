"""Compressed result objects reach every destination: as stored when the peer accepts the
file's transfer syntax, decompressed (same pixels) when it only takes uncompressed ones."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid
from support.peers import StoreSCP

from mammonode.config import Destination
from mammonode.delivery import send
from mammonode.demo.loopback import free_port

pytestmark = pytest.mark.network


def rle_secondary_capture(path) -> np.ndarray:
    pixels = (np.arange(64 * 48 * 3, dtype=np.uint32) % 251).astype(np.uint8).reshape(64, 48, 3)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ConversionType, ds.PatientName, ds.PatientID = "OT", "WSD", "TEST^RLE", "RLE1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    return pixels


@pytest.mark.parametrize("options, expected_syntax", [((), ExplicitVRLittleEndian), (("+xa",), RLELossless)])
def test_compressed_result_is_sent_as_the_peer_accepts(tmp_path, options, expected_syntax):
    path = tmp_path / "sc.dcm"
    pixels = rle_secondary_capture(path)
    port = free_port()
    scp = StoreSCP(tmp_path / "scp", port, options=options).start()
    try:
        dest = Destination(name="pacs", ae_title="STORESCP", host="127.0.0.1", port=port)
        outcome = send(dest, [(1, path, SecondaryCaptureImageStorage)], "MAMMONODE")
    finally:
        scp.stop()
    assert outcome == {1: (0x0000, "status 0x0000")}
    (received,) = scp.files()
    ds = pydicom.dcmread(received)
    assert ds.file_meta.TransferSyntaxUID == expected_syntax
    sent = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SOPInstanceUID == sent.SOPInstanceUID, "the same instance, whatever its transfer syntax"
    assert np.array_equal(ds.pixel_array, pixels)
