"""What a compressed frame declares about itself, checked before any decoder sees it.

A decoder allocates what the frame's own header declares, not what Rows and Columns say: a
JPEG 2000 frame whose SIZ marker declares 60000 x 60000 pixels has OpenJPEG allocate about
14 GB before it finds the data missing, in the process that also runs the listeners. So
before pixel data is decoded, :func:`check_pixel_data` reads each frame's header (JPEG SOF
of ITU-T T.81, JPEG-LS SOF55 of T.87, JPEG 2000 SIZ of ISO/IEC 15444-1, raw codestream or
JP2-wrapped; the RLE header of PS3.5 Annex G with each segment's decoded length) and refuses
a frame that differs from Rows, Columns and Samples per Pixel, and any image beyond a pixel
limit. Compressed syntaxes whose headers are not read here are refused, not decoded.
Messages name attributes and limits, never values of the patient.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

# 64 megapixels: a 4096 x 5120 detector (21 MP) and the largest mammography detectors fit with
# room to spare; decoded as float64 that is 512 MB at most.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
HEADER_BYTES = 1 << 20  # of each frame's start, enough for any header before the image data
MAX_J2K_TILES = 65535  # Isot (tile index) is 0-65534 (ISO/IEC 15444-1 A.4.2)

# T.81 B.1.1.3 / T.87: markers that open a frame header of the same layout (P, Y, X, Nf).
# C4 (DHT), C8 (JPG) and CC (DAC) lie in the SOF range but are not SOF markers; DE (DHP,
# hierarchical) declares the whole image; F7 is JPEG-LS SOF55.
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xDE, 0xF7}
_STANDALONE = {*range(0xD0, 0xD8), 0x01}  # RSTm, TEM: no length field
_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA


class FrameHeaderError(ValueError):
    """A frame header that is malformed, missing, or declares another image."""


@dataclass(frozen=True)
class FrameHeader:
    codec: str
    columns: int
    rows: int
    components: int
    precision: int


def jpeg_header(data: bytes) -> FrameHeader:
    """The frame header (SOFn, DHP or SOF55) of a JPEG or JPEG-LS interchange stream."""
    if data[:2] != b"\xff\xd8":
        raise FrameHeaderError("JPEG frame does not start with SOI")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise FrameHeaderError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (_SOI, _EOI, _SOS):
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            raise FrameHeaderError(f"JPEG segment length {length} at byte {pos}")
        if marker in _SOF:
            if pos + 10 > len(data) or length < 8:
                raise FrameHeaderError("JPEG frame header truncated")
            precision, rows, columns, components = struct.unpack_from(">BHHB", data, pos + 4)
            codec = "JPEG-LS" if marker == 0xF7 else "JPEG"
            return FrameHeader(codec, columns, rows, components, precision)
        pos += 2 + length
    raise FrameHeaderError(f"no JPEG frame header in the first {len(data)} bytes")


def _siz(data: bytes, at: int) -> FrameHeader:
    """The SIZ marker segment (ISO/IEC 15444-1 A.5.1) of the codestream starting at ``at``."""
    if data[at : at + 4] != b"\xff\x4f\xff\x51":
        raise FrameHeaderError("JPEG 2000 codestream does not start with SOC, SIZ")
    if len(data) < at + 4 + 38:
        raise FrameHeaderError("JPEG 2000 SIZ segment truncated")
    lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, csiz = struct.unpack_from(
        ">HHIIIIIIIIH", data, at + 4
    )
    if not 1 <= csiz <= 16384 or lsiz != 38 + 3 * csiz or len(data) < at + 4 + lsiz:
        raise FrameHeaderError("JPEG 2000 SIZ segment malformed (Lsiz, Csiz)")
    if not (xosiz < xsiz and yosiz < ysiz and xtsiz and ytsiz):
        raise FrameHeaderError("JPEG 2000 SIZ segment malformed (image or tile size)")
    if not (xtosiz <= xosiz < xtosiz + xtsiz and ytosiz <= yosiz < ytosiz + ytsiz):
        raise FrameHeaderError("JPEG 2000 SIZ segment malformed (tile offsets)")
    tiles = -(-(xsiz - xtosiz) // xtsiz) * -(-(ysiz - ytosiz) // ytsiz)
    if tiles > MAX_J2K_TILES:
        raise FrameHeaderError(f"JPEG 2000 SIZ declares {tiles} tiles, more than {MAX_J2K_TILES}")
    ssiz = data[at + 4 + 38]
    return FrameHeader("JPEG 2000", xsiz - xosiz, ysiz - yosiz, csiz, (ssiz & 0x7F) + 1)


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, content start, content end) of the JP2 boxes in ``data[start:end]`` (I.4)."""
    pos = start
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1:
            if pos + 16 > end:
                return
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif length == 0:  # the last box, to the end
            length = end - pos
        if length < header:
            raise FrameHeaderError("JP2 box length malformed")
        yield kind, pos + header, min(pos + length, end)
        pos += length


def j2k_header(data: bytes) -> FrameHeader:
    """The SIZ of a JPEG 2000 codestream, bare or in a JP2 file (whose image header must
    agree with it; a palette would multiply the components, and is refused)."""
    if data[:2] == b"\xff\x4f":
        return _siz(data, 0)
    if data[:12] != b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        raise FrameHeaderError("neither a JPEG 2000 codestream nor a JP2 file")
    ihdr = None
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind == b"jp2h":
            for sub, s, e in _boxes(data, start, end):
                if sub == b"ihdr" and e - s >= 14:
                    ihdr = struct.unpack_from(">IIH", data, s)  # HEIGHT, WIDTH, NC
                elif sub == b"pclr":
                    raise FrameHeaderError("JP2 palette box (pclr): not a DICOM image")
        elif kind == b"jp2c":
            header = _siz(data, start)
            if ihdr is not None and ihdr != (header.rows, header.columns, header.components):
                raise FrameHeaderError("JP2 image header box disagrees with the codestream's SIZ")
            return header
    raise FrameHeaderError(f"no JPEG 2000 codestream in the first {len(data)} bytes of the JP2 file")


def rle_segment_length(segment: bytes, limit: int) -> int:
    """The decoded length of one PackBits segment (PS3.5 G.3.1), counted without decoding,
    stopping once it passes ``limit``."""
    total = pos = 0
    end = len(segment)
    while pos < end and total <= limit:
        n = segment[pos]
        if n < 128:  # literal run of n + 1 bytes
            total += n + 1
            pos += n + 2
        elif n > 128:  # replicate run of 257 - n bytes
            total += 257 - n
            pos += 2
        else:
            pos += 1
    return total


def _check_rle(frame: bytes, rows: int, columns: int, segments: int) -> None:
    """pydicom's RLE decoder grows each segment as far as its runs say (up to 64 x its
    compressed size): each must decode to no more than Rows x Columns bytes."""
    if len(frame) < 64:
        raise FrameHeaderError("RLE header truncated")
    header = struct.unpack_from("<16I", frame)
    count, offsets = header[0], [*header[1 : 1 + min(header[0], 15)], len(frame)]
    if count != segments:
        raise FrameHeaderError(f"RLE header declares {count} segments, the image attributes {segments}")
    for i in range(count):
        start, end = offsets[i], offsets[i + 1]
        if not 64 <= start <= end <= len(frame):
            raise FrameHeaderError("RLE segment offsets malformed")
        if rle_segment_length(frame[start:end], rows * columns) > rows * columns:
            raise FrameHeaderError("an RLE segment decodes to more than Rows x Columns bytes")


def _frame_starts(ds: Dataset, frames: int, whole: bool) -> Iterator[bytes]:
    """Each frame's start (or whole frame) as pydicom will cut it from the pixel data."""
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    fragmented = generate_fragmented_frames(ds.PixelData, number_of_frames=frames, extended_offsets=extended)
    for _, fragments in zip(range(frames), fragmented, strict=False):
        if whole:
            yield b"".join(fragments)
            continue
        head = bytearray()
        for fragment in fragments:
            head += fragment[: HEADER_BYTES - len(head)]
            if len(head) >= HEADER_BYTES:
                break
        yield bytes(head)


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        raise FrameHeaderError(f"{keyword} missing or not a number") from None


def check_pixel_limits(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Rows x Columns x Samples per Pixel x Number of Frames within ``max_pixels``: what a
    decoder allocates for this data set, checked before its pixel data is read."""
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    samples, frames = _int(ds, "SamplesPerPixel", 1), _int(ds, "NumberOfFrames", 1)
    if min(rows, columns, samples, frames) < 1:
        raise FrameHeaderError("Rows, Columns, SamplesPerPixel or NumberOfFrames below 1")
    pixels = rows * columns * samples * frames
    if pixels > max_pixels:
        raise FrameHeaderError(
            f"Rows x Columns x SamplesPerPixel x NumberOfFrames is {pixels} pixels, "
            f"more than pipeline.max_pixels ({max_pixels})"
        )


def check_pixel_data(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse, before decoding, pixel data whose decoding would allocate beyond what the
    image attributes and ``max_pixels`` allow (see the module docstring). FrameHeaderError."""
    check_pixel_limits(ds, max_pixels)
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else "") or "1.2.840.10008.1.2")
    if not syntax.is_encapsulated:
        return  # native: pydicom checks the length against the image attributes
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    samples, frames = _int(ds, "SamplesPerPixel", 1), _int(ds, "NumberOfFrames", 1)
    if syntax == RLELossless:
        bytes_per_sample = -(-_int(ds, "BitsAllocated") // 8)
        for frame in _frame_starts(ds, frames, whole=True):
            _check_rle(frame, rows, columns, samples * bytes_per_sample)
        return
    if syntax in JPEG2000TransferSyntaxes:
        parse = j2k_header
    elif syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        parse = jpeg_header
    else:
        raise FrameHeaderError(f"transfer syntax {syntax} ({syntax.name}): frame headers cannot be checked")
    for index, start in enumerate(_frame_starts(ds, frames, whole=False)):
        header = parse(start)
        declared = (header.rows, header.columns, header.components)
        if declared != (rows, columns, samples):
            raise FrameHeaderError(
                f"{header.codec} frame {index + 1} declares {header.rows} x {header.columns} pixels, "
                f"{header.components} components; Rows x Columns is {rows} x {columns}, SamplesPerPixel {samples}"
            )
