"""The guards against decompression and image bombs, unit by unit: frame headers built by hand
from the standards (ITU-T T.81 B.2.2 SOF, T.87 SOF55, ISO/IEC 15444-1 A.5.1 SIZ and Annex I
boxes, PS3.5 G.3.1 PackBits), so the expected values come from the layout, not from our
parsers; and the capped, streaming inflation of Deflated Explicit VR Little Endian files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from mammonode.config import ConfigError, load_config
from mammonode.ingest.inflate import InflateRefused, inflate_to
from mammonode.pipeline.frames import (
    DEFAULT_MAX_PIXELS,
    FrameHeaderError,
    check_pixel_data,
    j2k_header,
    jpeg_header,
    rle_segment_length,
)
from mammonode.pipeline.images import ImageInputError, grey_pixels, read_dicom

MG = "1.2.840.10008.5.1.4.1.1.1.2"


def segment(marker: int, payload: bytes) -> bytes:
    """A marker segment: FFxx, then Lp (2 bytes, counting itself), then the payload."""
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def sof(marker: int, precision: int, rows: int, columns: int, components: int = 1) -> bytes:
    """T.81 B.2.2: P, Y, X, Nf, then Nf x (Ci, Hi|Vi, Tqi)."""
    specs = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    return segment(marker, struct.pack(">BHHB", precision, rows, columns, components) + specs)


SOI, EOI = b"\xff\xd8", b"\xff\xd9"
APP0 = segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
DQT = segment(0xDB, b"\x00" + bytes(range(1, 65)))
DHT = segment(0xC4, b"\x00" + bytes([0, 1] + [0] * 14) + b"\x05")  # C4 lies in the SOF range
SOS = segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")


def test_jpeg_baseline_sof0_gives_lines_samples_and_components():
    data = SOI + APP0 + DQT + DHT + sof(0xC0, 8, 3328, 2560) + DHT + SOS + b"\x12\x34" + EOI
    header = jpeg_header(data)
    assert (header.rows, header.columns, header.components, header.precision) == (3328, 2560, 1, 8)
    assert header.codec == "JPEG"


def test_jpeg_lossless_sof3_after_fill_bytes_and_restart_markers():
    # B.1.1.2: any marker may be preceded by fill bytes FF; RSTm and TEM carry no length.
    data = SOI + b"\xff\x01" + APP0 + b"\xff\xff" + sof(0xC3, 16, 5120, 4096) + SOS
    header = jpeg_header(data)
    assert (header.rows, header.columns, header.precision) == (5120, 4096, 16)


def test_jpeg_ls_sof55_after_an_lse_segment():
    lse = segment(0xF8, b"\x01" + struct.pack(">5H", 4095, 3, 7, 21, 64))  # T.87 C.2.4.1.1
    header = jpeg_header(SOI + lse + sof(0xF7, 12, 4096, 3328) + SOS)
    assert (header.codec, header.rows, header.columns, header.precision) == ("JPEG-LS", 4096, 3328, 12)


def test_jpeg_without_frame_header_before_scan_is_refused():
    with pytest.raises(FrameHeaderError, match="no JPEG frame header"):
        jpeg_header(SOI + APP0 + DHT + SOS + b"\x00" * 32)
    with pytest.raises(FrameHeaderError, match="SOI"):
        jpeg_header(b"\x00\x00" + sof(0xC0, 8, 10, 10))
    with pytest.raises(FrameHeaderError, match="truncated"):
        jpeg_header(SOI + sof(0xC0, 8, 10, 10)[:7])


def test_jpeg_from_an_encoder_declares_what_was_encoded():
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.zeros((53, 37), np.uint8)).save(out, format="JPEG")
    header = jpeg_header(out.getvalue())
    assert (header.rows, header.columns, header.components) == (53, 37, 1)


def siz(
    xsiz: int,
    ysiz: int,
    xosiz: int = 0,
    yosiz: int = 0,
    tile: tuple[int, int] | None = None,
    components: int = 1,
    depth: int = 12,
) -> bytes:
    """SOC, then SIZ (15444-1 A.5.1): Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz
    Csiz, then Csiz x (Ssiz, XRsiz, YRsiz)."""
    xtsiz, ytsiz = tile or (xsiz, ysiz)
    body = struct.pack(">HIIIIIIIIH", 0, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, 0, 0, components)
    body += bytes([depth - 1, 1, 1]) * components
    return b"\xff\x4f" + segment(0x51, body)


COD_AND_EOC = segment(0x52, b"\x00\x00\x00\x01\x00\x05\x04\x04\x00\x01") + b"\xff\xd9"


def test_j2k_siz_width_and_height_are_the_sizes_less_the_image_offsets():
    header = j2k_header(siz(3000, 3500, xosiz=440, yosiz=172) + COD_AND_EOC)
    assert (header.columns, header.rows, header.components, header.precision) == (2560, 3328, 1, 12)
    assert header.codec == "JPEG 2000"
    rgb = j2k_header(siz(640, 480, components=3, depth=8))
    assert (rgb.columns, rgb.rows, rgb.components, rgb.precision) == (640, 480, 3, 8)


def test_j2k_siz_declaring_a_huge_image_parses_as_declared():
    header = j2k_header(siz(60000, 60000, tile=(1024, 1024)) + COD_AND_EOC)
    assert (header.columns, header.rows) == (60000, 60000)


def test_j2k_malformed_siz_is_refused():
    with pytest.raises(FrameHeaderError, match="tiles"):  # Isot is 0-65534: at most 65535 tiles
        j2k_header(siz(60000, 60000, tile=(128, 128)))
    bad_length = bytearray(siz(100, 100))
    bad_length[4:6] = struct.pack(">H", 44)  # Lsiz must be 38 + 3 * Csiz
    with pytest.raises(FrameHeaderError, match="Lsiz"):
        j2k_header(bytes(bad_length))
    with pytest.raises(FrameHeaderError, match="image or tile size"):
        j2k_header(siz(100, 100, xosiz=100))
    with pytest.raises(FrameHeaderError, match="truncated"):
        j2k_header(siz(100, 100)[:20])
    with pytest.raises(FrameHeaderError, match="neither"):
        j2k_header(b"\x00" * 64)


def box(kind: bytes, content: bytes) -> bytes:
    return struct.pack(">I4s", len(content) + 8, kind) + content


def jp2(codestream: bytes, height: int, width: int, extra: bytes = b"") -> bytes:
    """15444-1 Annex I: signature, file type, header (image header + colour) and codestream."""
    ihdr = box(b"ihdr", struct.pack(">IIHBBBB", height, width, 1, 11, 7, 0, 0))
    colr = box(b"colr", bytes([1, 0, 0]) + struct.pack(">I", 17))
    return (
        box(b"jP  ", b"\r\n\x87\n")
        + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
        + box(b"jp2h", ihdr + colr + extra)
        + box(b"jp2c", codestream)
    )


def test_jp2_wrapped_codestream_is_read_and_must_agree_with_its_image_header():
    codestream = siz(2560, 3328) + COD_AND_EOC
    header = j2k_header(jp2(codestream, 3328, 2560))
    assert (header.rows, header.columns) == (3328, 2560)
    with pytest.raises(FrameHeaderError, match="disagrees"):
        j2k_header(jp2(codestream, 100, 2560))
    with pytest.raises(FrameHeaderError, match="palette"):
        j2k_header(jp2(codestream, 3328, 2560, extra=box(b"pclr", b"\x00\x01\x03\x07\x07\x07")))


def test_j2k_from_an_encoder_declares_what_was_encoded():
    from openjpeg import encode

    header = j2k_header(bytes(encode(np.zeros((53, 37), np.uint16), bits_stored=12)))
    assert (header.rows, header.columns, header.components) == (53, 37, 1)


def test_rle_segment_length_counts_packbits_runs():
    # G.3.1: n 0..127 copies the next n+1 bytes; -1..-127 repeats the next byte 1-n times;
    # -128 is a no-op. Here: literal 3 + replicate 3 (n=-2) + replicate 128 (n=-127) + no-op.
    segment_ = bytes([2, 7, 8, 9]) + bytes([0xFE, 5]) + bytes([0x81, 6]) + bytes([0x80])
    assert rle_segment_length(segment_, 10**6) == 3 + 3 + 128
    assert rle_segment_length(bytes([0x81, 0]) * 1000, 500) <= 500 + 128  # stops past the limit


def image(syntax: str, frame: bytes | None, rows: int, columns: int, bits: int = 16) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frame is not None:
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
    return ds


def test_frames_that_differ_from_rows_and_columns_are_refused_before_decoding():
    check_pixel_data(image(JPEG2000Lossless, siz(2560, 3328) + COD_AND_EOC, 3328, 2560))
    with pytest.raises(FrameHeaderError, match="declares 60000 x 60000"):
        check_pixel_data(image(JPEG2000Lossless, siz(60000, 60000, tile=(1024, 1024)) + COD_AND_EOC, 3328, 2560))
    with pytest.raises(FrameHeaderError, match="3 components"):
        check_pixel_data(image(JPEG2000Lossless, siz(2560, 3328, components=3), 3328, 2560))
    with pytest.raises(FrameHeaderError, match="declares 0 x 2560"):  # Y = 0: lines defined later by DNL
        check_pixel_data(image(JPEGLosslessSV1, SOI + sof(0xC3, 16, 0, 2560) + SOS, 3328, 2560))
    with pytest.raises(ImageInputError, match="not decoded: JPEG 2000 frame 1 declares 60000 x 60000"):
        grey_pixels(image(JPEG2000Lossless, siz(60000, 60000, tile=(1024, 1024)) + COD_AND_EOC, 3328, 2560))


def test_rle_frames_whose_segments_decode_beyond_the_image_are_refused():
    rows, columns = 2, 67  # 134 bytes per segment, one segment for 8 bits
    good = bytes([2, 7, 8, 9, 0xFE, 5, 0x81, 6])
    header = struct.pack("<16I", 1, 64, *[0] * 14)
    check_pixel_data(image(RLELossless, header + good, rows, columns, bits=8))
    bomb = bytes([0x81, 0]) * 5000  # 640,000 bytes from 10,000
    with pytest.raises(FrameHeaderError, match="more than Rows x Columns"):
        check_pixel_data(image(RLELossless, header + bomb, rows, columns, bits=8))
    with pytest.raises(FrameHeaderError, match="segments"):
        check_pixel_data(image(RLELossless, header + good, rows, columns, bits=16))


def test_pixel_limit_lets_large_detectors_through_and_refuses_beyond():
    assert 4096 * 5120 <= DEFAULT_MAX_PIXELS
    check_pixel_data(image(JPEG2000Lossless, siz(4096, 5120) + COD_AND_EOC, 5120, 4096))
    with pytest.raises(FrameHeaderError, match="pipeline.max_pixels"):
        check_pixel_data(image(JPEG2000Lossless, siz(8193, 8192, tile=(1024, 1024)), 8192, 8193))
    with pytest.raises(FrameHeaderError, match="pipeline.max_pixels"):
        check_pixel_data(image(JPEG2000Lossless, siz(2560, 3328), 3328, 2560), max_pixels=1000)


def test_an_uncompressed_image_beyond_the_limit_is_refused_before_its_pixels_are_read(tmp_path):
    ds = image(ExplicitVRLittleEndian, None, 100, 100)
    ds.PixelData = np.zeros((100, 100), np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    ds.SOPClassUID, ds.SOPInstanceUID = MG, generate_uid()
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    assert read_dicom(tmp_path / "a.dcm").Rows == 100
    with pytest.raises(ImageInputError, match="pixel data not read: .*pipeline.max_pixels"):
        read_dicom(tmp_path / "a.dcm", max_pixels=9999)


def deflated_file(path: Path, pixels: np.ndarray) -> Dataset:
    ds = image(ExplicitVRLittleEndian, None, *pixels.shape)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientName = MG, generate_uid(), "DOE^JANE"
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_a_deflated_file_becomes_the_same_data_set_in_explicit_vr_little_endian(tmp_path):
    pixels = np.arange(300 * 200, dtype=np.uint16).reshape(300, 200) % 4096
    ds = deflated_file(tmp_path / "d.dcm", pixels)
    assert inflate_to(tmp_path / "d.dcm", tmp_path / "plain.dcm", 1 << 20)
    plain = pydicom.dcmread(tmp_path / "plain.dcm")
    assert plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert plain.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert plain.SOPInstanceUID == ds.SOPInstanceUID and plain.PatientName == "DOE^JANE"
    assert np.array_equal(plain.pixel_array, pixels)
    assert not inflate_to(tmp_path / "plain.dcm", tmp_path / "again.dcm", 1 << 20)  # not deflated: untouched
    assert not (tmp_path / "again.dcm").exists()


def test_a_deflated_file_beyond_the_cap_or_broken_is_refused_and_nothing_written(tmp_path):
    deflated_file(tmp_path / "d.dcm", np.zeros((300, 200), np.uint16))  # 120,000 bytes of pixels
    with pytest.raises(InflateRefused, match="beyond 100000 bytes") as refused:
        inflate_to(tmp_path / "d.dcm", tmp_path / "out.dcm", 100_000)
    assert refused.value.too_large and not (tmp_path / "out.dcm").exists()
    raw = (tmp_path / "d.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(InflateRefused, match="truncated") as cut:
        inflate_to(tmp_path / "cut.dcm", tmp_path / "out.dcm", 1 << 20)
    assert not cut.value.too_large and not (tmp_path / "out.dcm").exists()
    meta_end = raw.index(b"1.2.840.10008.1.2.1.99") + 22
    (tmp_path / "junk.dcm").write_bytes(raw[:meta_end] + b"\xff" * 64)
    with pytest.raises(InflateRefused, match="not valid deflate"):
        inflate_to(tmp_path / "junk.dcm", tmp_path / "out.dcm", 1 << 20)


def test_inflation_holds_chunks_not_the_data_set(tmp_path):
    """200 MB of zeros inflate through a bounded buffer: the peak traced allocation stays a
    few chunks (zlib's own allocations are outside tracemalloc, and are fixed-size)."""
    import tracemalloc

    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MG, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 200 << 20)
    with open(tmp_path / "bomb.dcm", "wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
        deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        out.write(deflate.compress(body))
        for _ in range(200):
            out.write(deflate.compress(bytes(1 << 20)))
        out.write(deflate.flush())
    tracemalloc.start()
    try:
        with pytest.raises(InflateRefused):
            inflate_to(tmp_path / "bomb.dcm", tmp_path / "out.dcm", 100 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


@pytest.mark.parametrize(("key", "value"), [("storage.max_inflated_bytes", 0), ("pipeline.max_pixels", -1)])
def test_limits_are_validated(tmp_path, key, value):
    section, name = key.split(".")
    (tmp_path / "c.toml").write_text(f"[{section}]\n{name} = {value}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(tmp_path / "c.toml", environ={})
    (tmp_path / "empty.toml").write_text("")
    defaults = load_config(tmp_path / "empty.toml", environ={})
    assert (defaults.storage.max_inflated_bytes, defaults.pipeline.max_pixels) == (1 << 30, 64 << 20)
