"""Deflated data sets, inflated in a streaming way and with a cap, before pydicom sees them.

A Deflated Explicit VR Little Endian object (PS3.5 A.5) compresses its data set, not its File
Meta Information, with raw deflate. ``pydicom.dcmread`` inflates such a data set whole in
memory (``zlib.decompress(file.read())``), and deflate reaches ratios of about 1000:1, so
a few megabytes sent make the listener allocate gigabytes. Here the data set is inflated
chunk by chunk, counted first (nothing written) and then written as the equivalent
Explicit VR Little Endian file (the inflated bytes are exactly that encoding), so memory stays
at two chunks whatever the object, and one that inflates beyond the cap is refused before
any of it reaches the disk. Everything downstream (header checks, storage, the pipeline,
WADO-RS) then reads a plain file.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import FileMetaDataset

# The readers dcmread itself uses for the preamble, the File Meta Information and a stray
# command set, so the transfer syntax seen here is exactly the one it would act on.
from pydicom.filereader import _read_command_set_elements, _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

CHUNK = 1 << 20  # compressed bytes read, and inflated bytes produced, per step
DEFAULT_MAX_INFLATED_BYTES = 1 << 30


class InflateRefused(Exception):
    """The deflated data set is refused; ``str()`` is a reason fit for an ErrorComment, and
    ``too_large`` tells a data set beyond the cap from a broken one."""

    def __init__(self, reason: str, too_large: bool = False):
        super().__init__(reason)
        self.too_large = too_large


@dataclass(frozen=True)
class FileMeta:
    """What the File Meta Information says, and where the data set starts."""

    meta: FileMetaDataset
    data_offset: int

    @property
    def transfer_syntax(self) -> str:
        return str(self.meta.get("TransferSyntaxUID", "") or "").rstrip("\x00 ")

    @property
    def deflated(self) -> bool:
        return self.transfer_syntax == DeflatedExplicitVRLittleEndian

    def uid(self, keyword: str) -> str | None:
        value = str(self.meta.get(keyword, "") or "").rstrip("\x00 ")
        return value or None


def read_file_meta(path: Path) -> FileMeta | None:
    """The File Meta Information as dcmread reads it (preamble optional); None when the file
    has none pydicom can read (then dcmread cannot take it for a deflated one either) or
    cannot be read at all (the caller's own reading reports that)."""
    try:
        with open(path, "rb") as fh:
            read_preamble(fh, True)
            meta = _read_file_meta_info(fh)
            _read_command_set_elements(fh)
            return FileMeta(meta, fh.tell())
    except Exception:  # pydicom raises many types for a malformed header
        return None


def _inflated_chunks(fh: BinaryIO, limit: int):
    """Yield the inflated data set in chunks of at most CHUNK bytes; InflateRefused once more
    than ``limit`` bytes come out or the stream is not valid raw deflate."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof:
            data = inflater.unconsumed_tail or fh.read(CHUNK)
            out = inflater.decompress(data, CHUNK)  # b"" drains output zlib still holds
            if not data and not out:
                raise InflateRefused("deflated data set is truncated")  # dcmread refuses it too
            total += len(out)
            if total > limit:
                raise InflateRefused(f"deflated data set inflates beyond {limit} bytes", too_large=True)
            if out:
                yield out
    except zlib.error as exc:
        raise InflateRefused("deflated data set is not valid deflate data") from exc


def inflate_to(source: Path, target: Path, max_bytes: int) -> bool:
    """When ``source`` is a Deflated Explicit VR Little Endian file, write ``target`` as the
    same object in Explicit VR Little Endian and return True; otherwise False (``target``
    untouched). InflateRefused when the data set inflates beyond ``max_bytes``: counted in a
    first pass that writes nothing, so a refused one never reaches the disk."""
    meta = read_file_meta(source)
    if meta is None or not meta.deflated:
        return False
    with open(source, "rb") as fh:
        fh.seek(meta.data_offset)
        for _ in _inflated_chunks(fh, max_bytes):
            pass
    plain = FileMetaDataset(meta.meta)
    plain.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        with open(source, "rb") as fh, open(target, "xb") as out:
            out.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(out, plain, enforce_standard=True)
            fh.seek(meta.data_offset)
            for chunk in _inflated_chunks(fh, max_bytes):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except ValueError as exc:  # write_file_meta_info: required meta elements missing
        target.unlink(missing_ok=True)
        raise InflateRefused("deflated data set with incomplete file meta information") from exc
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return True
