"""Job errors without patient data: a message that quotes a header value (pydicom's "Unable to
convert '1961-07-04' to 'DA' object", a highdicom complaint naming a patient) names the
attribute instead, before it reaches the log, the job's error, the study's events and
``/status``.

The values to hide are the job's own: every text value of its source headers (and the
identifiers recorded for its instances), each replaced by ``<Keyword>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydicom.dataset import Dataset

# VRs whose values may carry patient data; UIDs (how the node names studies), codes and
# numbers stay.
TEXT_VRS = frozenset({"PN", "LO", "SH", "DA", "DT", "TM", "AS", "LT", "ST", "UT", "UC", "AE"})
MIN_LENGTH = 3  # shorter values (a sex, a one-digit number) would hide ordinary words


class PatientValues:
    """The text values of a job's headers, by attribute keyword, to hide in error messages."""

    def __init__(self) -> None:
        self._keyword_of: dict[str, str] = {}

    def add(self, keyword: str, value) -> None:
        text = str(value or "").strip()
        if len(text) < MIN_LENGTH:
            return
        self._keyword_of.setdefault(text, keyword)
        if "^" in text or "=" in text:  # a name: each component alone too
            for part in re.split(r"[\^=]", text):
                if len(part.strip()) >= MIN_LENGTH:
                    self._keyword_of.setdefault(part.strip(), keyword)

    def add_dataset(self, ds: Dataset) -> None:
        for tag in list(ds.keys()):
            try:  # a value pydicom cannot read is skipped here, never a second failure
                elem = ds[tag]
                if elem.VR == "SQ":
                    for item in elem.value or []:
                        self.add_dataset(item)
                elif elem.VR in TEXT_VRS and elem.value is not None:
                    values: Iterable = elem.value if elem.VM > 1 else [elem.value]
                    for value in values:
                        self.add(elem.keyword or str(elem.tag), value)
            except Exception:  # noqa: BLE001
                continue

    def scrub(self, text: str) -> str:
        """``text`` with every known value replaced by ``<Keyword>`` (in one pass, longest
        value first, so a replacement is never itself rewritten)."""
        if not self._keyword_of or not text:
            return text
        pattern = re.compile("|".join(re.escape(v) for v in sorted(self._keyword_of, key=len, reverse=True)))
        return pattern.sub(lambda m: f"<{self._keyword_of[m.group(0)]}>", text)
