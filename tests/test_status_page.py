"""The status page as an operator meets it: what fails now apart from the history, the running
job's stage, test weights marked, patient identifiers only when configured, and the page as
headless Chromium draws it at two common screen sizes (screenshots in artifacts/)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from support.browser import screenshot
from test_state_machines import (
    Attempt,
    claimed_job,
    deliveries,
    failure,
    migrated,  # noqa: F401 - the fixture behind db
    record_attempts,
)
from test_state_machines import db as db  # noqa: F401 - fixture

from mammonode.config import Config
from mammonode.db.jobs import finish, set_stage
from mammonode.db.models import Study
from mammonode.web.status_page import render_status_page

RESULT = {
    "cancer": {"image_heatmaps": {"right_malignant": 0.61, "left_malignant": 0.34}},
    "density": {"density_histogram": {"category": "b"}},
    "test_weights": True,
}


def populated(db) -> dict:
    """A done study (test weights), a running one at the heatmaps stage, a destination that
    failed and then took everything, and one that keeps failing."""
    done_id, done_job = claimed_job(db, "w1")
    with db.session() as s:
        assert finish(s, done_job, "w1", {}, RESULT)
    running_id, running_job = claimed_job(db, "w1")
    with db.session() as s:
        set_stage(s, running_job, "w1", "heatmaps")
    healed, broken = deliveries(db, ("archive", "viewer"), study_id=done_id)
    study_of = {healed: "s", broken: "s"}
    with db.session() as s:
        record_attempts(s, "archive", {healed: failure("archive refused the association")}, study_of, 5, (1, 1))
        record_attempts(s, "viewer", {broken: failure("viewer timed out")}, study_of, 5, (1, 1))
    with db.session() as s:
        record_attempts(s, "archive", {healed: Attempt(True, 0, "stored")}, study_of, 5, (1, 1))
    with db.session() as s:
        return {
            "done": s.get(Study, done_id).study_instance_uid,
            "running": s.get(Study, running_id).study_instance_uid,
            "accession": s.get(Study, done_id).accession_number,
        }


def test_status_page_separates_failing_now_marks_test_weights_and_hides_phi(db):
    studies = populated(db)
    html = render_status_page(Config(), db)
    failing_now = html.split("<h2>Failing now</h2>")[1].split("<h2>")[0]
    history = html.split("<h2>Error history</h2>")[1]
    assert "viewer timed out" in failing_now and "archive refused" not in failing_now
    assert "archive refused the association" in history, "resolved errors stay in the history"
    assert "<h2>Running</h2>" in html and "stage <b>heatmaps</b>" in html
    assert "<span class='test'>TEST WEIGHTS</span>" in html
    assert f"title='{studies['done']}'" in html and f">{studies['done']}<" not in html, "short UID shown"
    assert studies["accession"] not in html and "Test^Patient" not in html and "PID1" not in html
    with_phi = Config()
    with_phi.dicomweb.status_page_phi = True
    html = render_status_page(with_phi, db)
    assert studies["accession"] in html and f">{studies['done']}<" in html and "<th>accession</th>" in html
    assert "Test^Patient" not in html and "PID1" not in html, "names and patient IDs are never on the page"


def test_status_page_in_chromium_at_1280x800_and_1920x1080(db, tmp_path, artifacts):
    populated(db)
    for _ in range(20):  # a page with a full table of done studies
        study_id, job_id = claimed_job(db, "w1")
        with db.session() as s:
            assert finish(s, job_id, "w1", {}, RESULT)
    page = tmp_path / "status.html"
    page.write_text(render_status_page(Config(), db))
    for width, height in ((1280, 800), (1920, 1080)):
        shot = artifacts / f"status-page-{width}x{height}.png"
        screenshot(page.as_uri(), shot, width, height)
        pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
        assert pixels.shape[:2] == (height, width)
        assert pixels.std() > 10, "blank screenshot"
        # "Failing now" is at the top, in red (#f77), whatever the screen size.
        red = (pixels[..., 0] > 200) & (np.abs(pixels[..., 1] - 119) < 30) & (np.abs(pixels[..., 2] - 119) < 30)
        assert red[: height // 4].sum() > 200, "the failing delivery is drawn in red near the top"
