"""Stable UIDs for result objects.

A result's UID is a 2.25 UID (ISO/IEC 9834-8: a UUID written as a decimal integer) made
from a name-based UUID over (study UID, input selection, object kind). Running the same
inputs again therefore produces the same UIDs, so a re-sent result replaces its earlier copy
in a PACS instead of duplicating it; new inputs produce new UIDs.
"""

from __future__ import annotations

import uuid

_NAMESPACE = uuid.UUID("6c7b0f7e-2b1a-5d6e-9c1f-6d616d6d6f6e")  # fixed namespace for mammonode


def stable_uid(study_uid: str, selection_key: str, kind: str) -> str:
    return f"2.25.{uuid.uuid5(_NAMESPACE, f'{study_uid}|{selection_key}|{kind}').int}"
