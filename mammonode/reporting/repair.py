"""Source header values that real devices send but DICOM forbids, repaired or dropped before
result objects copy them (as a PACS does on ingest): a birth date written 1961-07-04, times
with colons, lower-case sex, an age in words, an over-long name component.

Pure: :func:`repaired` returns a new data set (the source is left as it is), sharing every
element it does not change. A value that can be read unambiguously is rewritten in the
standard form; any other invalid value is emptied (the attribute stays, as Type 2
attributes must). UIDs and binary values are never touched.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

# Maximum value lengths of the string VRs (PS3.5 6.2); PN is per component group.
MAX_LENGTH = {"AE": 16, "CS": 16, "DS": 16, "IS": 12, "LO": 64, "SH": 16, "ST": 1024, "LT": 10240, "AS": 4}
_CS = re.compile(r"^[A-Z0-9 _]*$")
_AS = re.compile(r"^\d{3}[DWMY]$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_DT = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_AGE_UNITS = {"d": "D", "day": "D", "days": "D", "w": "W", "week": "W", "weeks": "W", "m": "M", "month": "M"}
_AGE_UNITS |= {"months": "M", "y": "Y", "yr": "Y", "yrs": "Y", "year": "Y", "years": "Y"}
PATIENT_SEX = {"M", "F", "O"}


def _da(value: str) -> str:
    """YYYYMMDD from YYYYMMDD, YYYY-MM-DD, YYYY/MM/DD or YYYY.MM.DD, if it is a real date."""
    text = value.strip()
    match = re.fullmatch(r"(\d{4})[-/.]?(\d{2})[-/.]?(\d{2})", text)
    if not match:
        return ""
    try:
        return date(*map(int, match.groups())).strftime("%Y%m%d")
    except ValueError:
        return ""


def _tm(value: str) -> str:
    """HHMMSS.FFFFFF from the same with colons (10:12:33), if hours, minutes, seconds are in range."""
    text = value.strip().replace(":", "")
    match = _TM.fullmatch(text)
    if not match:
        return ""
    hh, mm, ss, _ = match.groups()
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        return ""
    return text


def _dt(value: str) -> str:
    text = re.sub(r"(?<=\d)[-:/ T](?=\d)", "", value.strip())
    return text if _DT.fullmatch(text) and len(text) <= 26 else ""


def _as(value: str) -> str:
    """nnnD/W/M/Y from itself, from "50Y", "50 years", or a bare number of years; else empty."""
    text = value.strip()
    if _AS.fullmatch(text):
        return text
    match = re.fullmatch(r"(\d{1,3})\s*([A-Za-z]*)", text)
    if not match:
        return ""
    number, unit = match.groups()
    unit = _AGE_UNITS.get(unit.lower(), "") if unit else "Y"
    return f"{int(number):03d}{unit}" if unit else ""


def _cs(value: str) -> str:
    text = value.strip().upper()
    return text if len(text) <= 16 and _CS.fullmatch(text) else ""


def _pn(value) -> str:
    """Each component group (alphabetic, ideographic, phonetic) cut to 64 characters, at a
    component boundary when one falls inside, never in the middle of the separators."""
    groups = str(value).split("=")
    out = []
    for group in groups[:3]:
        components = group.split("^")[:5]
        while len("^".join(components)) > 64:
            over = len("^".join(components)) - 64
            longest = max(range(len(components)), key=lambda i: len(components[i]))
            components[longest] = components[longest][: max(0, len(components[longest]) - over)]
        out.append("^".join(components).rstrip("^"))
    return "=".join(out).rstrip("=")


def _limited(vr: str) -> Callable[[str], str]:
    limit = MAX_LENGTH[vr]

    def cut(value: str) -> str:
        text = str(value)
        return text if len(text) <= limit else text[:limit].rstrip()

    return cut


def _fixer(elem: DataElement) -> Callable[[str], str] | None:
    if elem.keyword == "PatientSex":
        return lambda v: v.strip().upper() if v.strip().upper() in PATIENT_SEX else ""
    return {"DA": _da, "TM": _tm, "DT": _dt, "AS": _as, "PN": _pn}.get(elem.VR) or (
        _cs if elem.VR == "CS" else _limited(elem.VR) if elem.VR in MAX_LENGTH else None
    )


def _repair_value(elem: DataElement, fix: Callable[[str], str]):
    """The repaired value, or ``elem.value`` itself when nothing changes."""
    value = elem.value
    if value is None or value == "":
        return value
    values = list(value) if isinstance(value, MultiValue) else [value]
    fixed = []
    for v in values:
        text = str(v) if isinstance(v, PersonName) else v
        if not isinstance(text, str):
            return value  # numbers already parsed (IS/DS): pydicom read them, leave them
        fixed.append(fix(text))
    if fixed == [str(v) for v in values]:
        return value
    fixed = [f for f in fixed if f] if len(fixed) > 1 else fixed
    return fixed if len(fixed) > 1 else (fixed[0] if fixed else "")


def repaired(ds: Dataset) -> Dataset:
    """A copy of ``ds`` whose invalid values are repaired or emptied (nested sequences too)."""
    out = Dataset()
    if getattr(ds, "file_meta", None) is not None:
        out.file_meta = ds.file_meta
    for elem in ds:
        if elem.VR == "SQ":
            items = [repaired(item) for item in elem.value]
            out.add(DataElement(elem.tag, "SQ", items))
            continue
        fix = _fixer(elem)
        if fix is None:
            out.add(elem)
            continue
        try:
            value = _repair_value(elem, fix)
        except Exception:  # an unreadable value is dropped, never a failed job
            value = ""
        out.add(elem if value is elem.value else DataElement(elem.tag, elem.VR, value))
    return out
