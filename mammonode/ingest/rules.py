"""Routing rules: which configured rule (``[[rules]]``, parsed in config.py) a received
instance falls under, and why.

Rules are tried in order and the first whose conditions all hold applies; the last rule
always matches everything (the implicit ``default``, action ``process``). A condition's
patterns match the attribute's value case-sensitively with :func:`fnmatch.fnmatchcase`
(``*``, ``?``, ``[...]``; a value without them is an exact match), after stripping the
padding spaces DICOM allows; any one of a list matches; for a multi-valued attribute any
one value does. An attribute that is absent or empty matches no pattern, and a rule with
``patient_age`` never matches an instance whose age cannot be told.

The age is the instance's Patient's Age (0010,1010) when it is valid AS (PS3.5 Table 6.2-1:
``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``), else the completed years between Patient's Birth
Date (0010,0030) and Study Date (0008,0020). Days, weeks and months count as completed years
of 365.2425 days or 12 months.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from fnmatch import fnmatchcase

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from mammonode.config import RULE_ATTRIBUTES, Rule

_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER_YEAR = 365.2425  # the Gregorian calendar's mean year


@dataclass(frozen=True)
class Match:
    """The rule that applies (its position in the configured list), the conditions that held,
    and for each earlier rule the first condition that did not."""

    rule: Rule
    index: int
    reasons: tuple[str, ...]
    passed_over: tuple[tuple[int, str, str], ...] = field(default=())  # (index, rule name, why not)

    @property
    def action(self) -> str:
        return self.rule.action


def age_from_as(value: str) -> int | None:
    """Completed years of an Age String (``018M`` -> 1); None when not valid AS."""
    found = _AGE.match(value.strip())
    if not found:
        return None
    number, unit = int(found.group(1)), found.group(2)
    if unit == "Y":
        return number
    if unit == "M":
        return number // 12
    days = number * 7 if unit == "W" else number
    return int(days // _DAYS_PER_YEAR)


def _date(value: object) -> date | None:
    text = str(value or "").strip()
    if not re.match(r"^\d{8}$", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def age_from_dates(birth: object, study: object) -> int | None:
    """Completed years from a birth date to a study date (DA, YYYYMMDD); None when either is
    missing or invalid, or the birth date is after the study date."""
    born, on = _date(birth), _date(study)
    if born is None or on is None or born > on:
        return None
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def patient_age(ds: Dataset) -> tuple[int | None, str]:
    """The instance's age in completed years and where it came from."""
    age = age_from_as(str(ds.get("PatientAge", "") or ""))
    if age is not None:
        return age, "Patient's Age"
    age = age_from_dates(ds.get("PatientBirthDate"), ds.get("StudyDate"))
    if age is not None:
        return age, "Patient's Birth Date and Study Date"
    return None, ""


def _values(ds: Dataset, key: str, calling_ae: str | None) -> list[str]:
    if key == "calling_ae":
        raw: object = calling_ae
    else:
        raw = ds.get(RULE_ATTRIBUTES[key])
    items = list(raw) if isinstance(raw, (MultiValue, list, tuple)) else [raw]
    return [text for item in items if item is not None and (text := str(item).strip(" \x00"))]


def _check(rule: Rule, ds: Dataset, calling_ae: str | None) -> tuple[list[str], str | None]:
    """The conditions that held, or the first that did not."""
    held = []
    for key, patterns in rule.match.items():
        values = _values(ds, key, calling_ae)
        hit = next(((v, p) for v in values for p in patterns if fnmatchcase(v, p)), None)
        if hit is None:
            shown = "absent" if not values else " / ".join(repr(v) for v in values)
            return held, f"{key} {shown} matches none of {list(patterns)}"
        held.append(f"{key} {hit[0]!r} matches {hit[1]!r}")
    if rule.patient_age is not None:
        low, high = rule.patient_age
        age, source = patient_age(ds)
        if age is None:
            return held, "patient_age unknown (no valid Patient's Age, Birth Date and Study Date)"
        if not low <= age <= high:
            return held, f"patient_age {age} (from {source}) outside [{low}, {high}]"
        held.append(f"patient_age {age} (from {source}) in [{low}, {high}]")
    return held, None


def match(rules: Sequence[Rule], ds: Dataset, calling_ae: str | None = None) -> Match:
    """The first rule whose conditions all hold. ``calling_ae``: the association's calling
    AE title (None for STOW-RS: then no rule naming calling_ae matches)."""
    passed = []
    for index, rule in enumerate(rules):
        held, failed = _check(rule, ds, calling_ae)
        if failed is None:
            reasons = tuple(held) or ("no conditions: matches every instance",)
            return Match(rule, index, reasons, tuple(passed))
        passed.append((index, rule.name, failed))
    raise ValueError("no rule matched: the rule list must end with one that matches everything")
