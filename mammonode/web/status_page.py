"""The status page at ``/``: one self-contained HTML page (no scripts or assets from elsewhere)
that refreshes itself. Patient identifiers are never shown."""

from __future__ import annotations

from html import escape

from sqlalchemy import select

from mammonode import __version__
from mammonode.config import Config
from mammonode.db.models import Job, JobState, Study
from mammonode.db.queries import status, study_summary
from mammonode.db.session import Database

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#111;color:#eee}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.5rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #444;padding:.3rem .6rem;text-align:left}
th{background:#222}.done{color:#7d7}.failed,.incomplete{color:#f77}.running,.queued,.ready{color:#fd5}
.note{color:#aaa;font-size:.85rem}.warn{color:#fd5}.err{color:#f77}
"""


def _outputs(job: Job | None) -> str:
    if job is None or not job.result:
        return ""
    result = job.result
    parts = []
    for model, preds in (result.get("cancer") or {}).items():
        parts.append(f"{model}: R {preds['right_malignant']:.2f} / L {preds['left_malignant']:.2f}")
    for model, dens in (result.get("density") or {}).items():
        parts.append(f"density {model}: {dens['category']}")
    if result.get("test_weights"):
        parts.append("TEST WEIGHTS")
    return "; ".join(parts)


def render_status_page(cfg: Config, db: Database, limit: int = 25) -> str:
    with db.session() as session:
        data = status(session, cfg.study.quiet_period_s, cfg.worker.stale_after_s, errors=10)
        rows = []
        for study in session.execute(select(Study).order_by(Study.updated_at.desc()).limit(limit)).scalars():
            summary = study_summary(session, study, cfg.study.quiet_period_s)
            job = (
                session.execute(
                    select(Job)
                    .where(Job.study_id == study.id, Job.state == JobState.DONE)
                    .order_by(Job.finished_at.desc())
                )
                .scalars()
                .first()
            )
            rows.append((summary, _outputs(job)))
    counts = "".join(f"<th>{escape(k)}</th>" for k in data["studies"])
    values = "".join(f"<td>{v}</td>" for v in data["studies"].values())
    jobs = ", ".join(f"{escape(k)} {v}" for k, v in data["jobs"].items())
    deliveries = ", ".join(f"{escape(k)} {v}" for k, v in data["deliveries"].items())
    alive = sum(1 for w in data["workers"] if w["alive"])
    study_rows = (
        "".join(
            f"<tr><td>{escape(s['study_instance_uid'])}</td><td class='{escape(s['state'])}'>{escape(s['state'])}</td>"
            f"<td>{' '.join(f'{escape(k)}:{v}' for k, v in s['views'].items())}</td>"
            f"<td>{escape(', '.join(s['missing_views']))}</td><td>{escape(out)}</td>"
            f"<td>{escape(s['updated_at'] or '')}</td></tr>"
            for s, out in rows
        )
        or "<tr><td colspan='6'>no studies yet</td></tr>"
    )
    errors = (
        "".join(
            f"<tr><td>{escape(e['at'] or '')}</td><td class='{'err' if e['level'] == 'ERROR' else 'warn'}'>"
            f"{escape(e['level'])}</td><td>{escape(e['kind'])}</td><td>{escape(e['study_instance_uid'] or '')}</td>"
            f"<td>{escape(e['message'])}</td></tr>"
            for e in data["errors"]
        )
        or "<tr><td colspan='5'>none</td></tr>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>mammonode status</title><style>{_STYLE}</style></head>
<body><h1>mammonode {escape(__version__)} &mdash; {escape(cfg.node.ae_title)}</h1>
<p class="note">AI results are not for primary diagnosis. This page refreshes every 10 seconds.</p>
<h2>Queue</h2><table><tr>{counts}</tr><tr>{values}</tr></table>
<p>jobs: {jobs}<br>deliveries: {deliveries}<br>workers alive: {alive} of {len(data["workers"])}</p>
<h2>Recent studies</h2>
<table><tr><th>Study Instance UID</th><th>state</th><th>views</th><th>missing</th><th>model outputs
(P malignant, density)</th><th>updated</th></tr>{study_rows}</table>
<h2>Recent errors</h2>
<table><tr><th>at</th><th>level</th><th>kind</th><th>study</th><th>message</th></tr>{errors}</table>
</body></html>"""
