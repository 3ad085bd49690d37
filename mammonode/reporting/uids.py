"""Stable UIDs for result objects, per result version.

A result's UID is a 2.25 UID (ISO/IEC 9834-8: a UUID written as a decimal integer) made
from a name-based UUID over (study UID, version key, object kind). The version key
(:func:`version_key`) hashes everything that can change a result: the study, its input
selection, each model's weights, the software version, the model set, the pipeline
parameters and the settings the result objects are rendered with.
Building the same version again gives the same UIDs, so a re-sent result replaces its
earlier copy in a PACS instead of duplicating it; anything different gives new UIDs, so a
PACS that keeps the first copy of a UID never keeps a stale result under it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the pipeline module loads PyTorch; only its type is needed here
    from mammonode.pipeline.run import PipelineResult

_NAMESPACE = uuid.UUID("6c7b0f7e-2b1a-5d6e-9c1f-6d616d6d6f6e")  # fixed namespace for mammonode


def version_key(
    study_uid: str, selection_key: str, result: PipelineResult, rendering: Mapping[str, Any] | None = None
) -> str:
    """The result version: sha256 (hex) over the study, the input selection, each run
    model's name and weights sha256, the software version, the selected model set (models
    that ran or were skipped), the pipeline parameters and the ``rendering`` settings of
    the result objects (config ``[results]``). The one place this is decided."""
    payload = {
        "study": study_uid,
        "inputs": selection_key,
        "weights": {name: prov.sha256 for name, prov in sorted(result.models.items())},
        "software": result.software_version,
        "models": sorted(set(result.models) | set(result.skipped)),
        "parameters": result.parameters,
        "rendering": dict(rendering or {}),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def stable_uid(study_uid: str, key: str, kind: str) -> str:
    """The UID of one object (or series) ``kind`` of the version ``key`` of a study."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, f'{study_uid}|{key}|{kind}').int}"
