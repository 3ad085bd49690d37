"""Collecting one exam's four views from DICOM files and/or PNG files."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from mammonode.exam.assignment import assign_view
from mammonode.exam.views import VIEWS
from mammonode.pipeline.images import ImageInputError, PreparedView, prepare_dicom, prepare_png, read_dicom


def parse_png_spec(spec: str) -> tuple[str, Path]:
    if "=" not in spec:
        raise ImageInputError(f"--png expects VIEW=PATH, got {spec!r}")
    view, path = spec.split("=", 1)
    view = view.strip().upper()
    if view not in VIEWS:
        raise ImageInputError(f"--png view must be one of {', '.join(VIEWS)}, got {view!r}")
    return view, Path(path)


def _one_exam(headers: list) -> None:
    """Files of two studies or two patients are not one exam (a mix-up, not a request)."""
    for keyword, what in (("StudyInstanceUID", "studies"), ("PatientID", "patients")):
        values = {str(ds.get(keyword, "") or "").strip() for ds in headers} - {""}
        if len(values) > 1:
            raise ImageInputError(
                f"the files belong to {len(values)} different {what}; "
                "pass --allow-mixed-studies to run them as one exam anyway"
            )


def prepare_exam(
    dicom_files: Iterable[Path] = (),
    png_specs: Iterable[str] = (),
    png_mirrored: Iterable[str] = (),
    allow_mixed: bool = False,
) -> tuple[dict[str, PreparedView], float]:
    """Prepared views and the seconds it took. A view given twice is an error, and so are
    files of different studies or patients unless ``allow_mixed``."""
    start = time.perf_counter()
    views: dict[str, PreparedView] = {}
    mirrored = {v.strip().upper() for v in png_mirrored}
    datasets = [(Path(path), read_dicom(Path(path))) for path in dicom_files]
    if not allow_mixed:
        _one_exam([ds for _, ds in datasets])
    for path, ds in datasets:
        assignment = assign_view(ds)
        if not assignment.usable:
            raise ImageInputError(f"{path}: not a usable screening view ({assignment.reason})")
        if assignment.view in views:
            raise ImageInputError(f"{path}: a second {assignment.view} image")
        views[assignment.view] = prepare_dicom(assignment.view, ds, str(path))
    for spec in png_specs:
        view, path = parse_png_spec(spec)
        if view in views:
            raise ImageInputError(f"{path}: a second {view} image")
        views[view] = prepare_png(view, path, mirrored=view in mirrored)
    return views, time.perf_counter() - start
