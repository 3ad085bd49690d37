"""The status page at ``/``: one self-contained HTML page (no scripts or assets from elsewhere)
that refreshes itself.

What fails now is shown apart from the error history; running jobs show their stage; results
from test weights are marked. Patient identifiers (study date, accession) are shown only when
``dicomweb.status_page_phi`` is set; otherwise studies are named by a short UID (the full UID
is in the cell's title). Tokens that must stay whole (UIDs, times, view counts) never wrap.
"""

from __future__ import annotations

from html import escape

from sqlalchemy import select

from mammonode import __version__
from mammonode.config import Config
from mammonode.db.models import Job, JobState, Study
from mammonode.db.queries import local_time, status, study_summary
from mammonode.db.session import Database

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#111;color:#eee;max-width:110rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.5rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #444;padding:.3rem .6rem;text-align:left;
vertical-align:top}th{background:#222}
.done{color:#7d7}.failed,.incomplete{color:#f77}.running,.queued,.ready{color:#fd5}
.note{color:#aaa;font-size:.85rem}.warn{color:#fd5}.err{color:#f77}.hist{color:#999}
.nw{white-space:nowrap}.uid{font-family:ui-monospace,monospace;white-space:nowrap}
.test{background:#b00;color:#fff;font-weight:bold;padding:0 .3rem;border-radius:.2rem;white-space:nowrap}
.ok{color:#7d7}
"""


def _short_uid(uid: str) -> str:
    """The UID's last 16 characters (enough to tell studies apart; `mammonode study` takes a
    unique prefix of the full UID, which the cell's title holds)."""
    return uid if len(uid) <= 20 else "\u2026" + uid[-16:]


def _outputs(job: Job | None) -> str:
    """The latest result's scores, HTML; test weights marked."""
    if job is None or not job.result:
        return ""
    result = job.result
    parts = []
    for model, preds in (result.get("cancer") or {}).items():
        scores = f"R {preds['right_malignant']:.2f} / L {preds['left_malignant']:.2f}"
        parts.append(f"<span class='nw'>{escape(model)}: {scores}</span>")
    for model, dens in (result.get("density") or {}).items():
        parts.append(f"<span class='nw'>density {escape(model)}: {escape(str(dens['category']))}</span>")
    if result.get("images") and not result.get("cancer"):
        parts.append("<span class='nw warn'>image-wise only</span>")
    if result.get("test_weights"):
        parts.append("<span class='test'>TEST WEIGHTS</span>")
    return "; ".join(parts)


def _views(views: dict[str, int]) -> str:
    return " ".join(
        f"<span class='nw {'ok' if n else 'hist'}'>{escape(view)}&nbsp;{n}</span>" for view, n in views.items()
    )


def _study_rows(rows: list[tuple[dict, str]], phi: bool) -> str:
    out = []
    for s, outputs in rows:
        uid = s["study_instance_uid"]
        identity = ""
        if phi:
            date = s.get("study_date") or ""
            identity = (
                f"<td class='nw'>{escape(date)}</td><td class='nw'>{escape(s.get('accession_number') or '')}</td>"
            )
        out.append(
            f"<tr><td class='uid' title='{escape(uid)}'>{escape(uid if phi else _short_uid(uid))}</td>{identity}"
            f"<td class='{escape(s['state'])} nw'>{escape(s['state'])}</td><td>{_views(s['views'])}</td>"
            f"<td>{escape(', '.join(s['missing_views']))}</td><td>{outputs}</td>"
            f"<td class='nw'>{escape(local_time(s['updated_at']))}</td></tr>"
        )
    columns = 8 if phi else 6
    return "".join(out) or f"<tr><td colspan='{columns}'>no studies yet</td></tr>"


def _failing(data: dict) -> str:
    now = data["failing"]
    items = []
    for d in now["deliveries"]:
        retry = f", next try {escape(local_time(d['next_attempt_at']))}" if d["next_attempt_at"] else ""
        items.append(
            f"<li class='err'>delivery to <b>{escape(d['destination'])}</b>: {d['failed']} failed, "
            f"{d['retrying']} retrying ({d['studies']} {'study' if d['studies'] == 1 else 'studies'}{retry}): "
            f"{escape(d['last_error'] or '')}</li>"
        )
    for c in now.get("commitments", []):
        items.append(
            f"<li class='err'>storage commitment by <b>{escape(c['destination'])}</b>: {c['timeouts']} "
            f"commit-timeout ({c['studies']} {'study' if c['studies'] == 1 else 'studies'}): "
            f"{escape(c['last_error'] or '')}</li>"
        )
    for n in now.get("notifications", []):
        retry = f", next try {escape(local_time(n['next_attempt_at']))}" if n["next_attempt_at"] else ""
        items.append(
            f"<li class='err'>notifications to <b>{escape(n['hook'])}</b>: {n['failed']} failed, "
            f"{n['retrying']} retrying{retry}: {escape(n['last_error'] or '')}</li>"
        )
    for f in now["studies"]:
        items.append(
            f"<li class='err'>study <span class='uid'>{escape(_short_uid(f['study_instance_uid']))}</span> failed "
            f"<span class='nw'>{escape(local_time(f['since']))}</span>: {escape(f['error'] or '')}</li>"
        )
    return f"<ul>{''.join(items)}</ul>" if items else "<p class='ok'>nothing is failing</p>"


def _running(data: dict) -> str:
    if not data["running"]:
        return ""
    items = "".join(
        f"<li><span class='uid'>{escape(_short_uid(r['study_instance_uid']))}</span>: stage "
        f"<b>{escape(r['stage'] or 'starting')}</b> (since <span class='nw'>{escape(local_time(r['started_at']))}"
        f"</span>)</li>"
        for r in data["running"]
    )
    return f"<h2>Running</h2><ul>{items}</ul>"


def render_status_page(cfg: Config, db: Database, limit: int = 25) -> str:
    phi = cfg.dicomweb.status_page_phi
    with db.session() as session:
        data = status(session, cfg.study.quiet_period_s, cfg.worker.stale_after_s, errors=10)
        rows = []
        for study in session.execute(select(Study).order_by(Study.updated_at.desc()).limit(limit)).scalars():
            summary = study_summary(session, study, cfg.study.quiet_period_s, show_phi=phi)
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
    if any(data.get("commitments", {}).values()):
        deliveries += (
            " (storage commitment: " + ", ".join(f"{escape(k)} {v}" for k, v in data["commitments"].items()) + ")"
        )
    hooks = data.get("notifications", {})
    notified = (
        "<br>notifications: " + ", ".join(f"{escape(k)} {v}" for k, v in hooks.items()) if any(hooks.values()) else ""
    )
    alive = sum(1 for w in data["workers"] if w["alive"])
    identity_heads = "<th>study date</th><th>accession</th>" if phi else ""
    history = (
        "".join(
            f"<tr class='hist'><td class='nw'>{escape(local_time(e['at']))}</td>"
            f"<td class='{'err' if e['level'] == 'ERROR' else 'warn'}'>{escape(e['level'])}</td>"
            f"<td class='nw'>{escape(e['kind'])}</td>"
            f"<td class='uid'>{escape(_short_uid(e['study_instance_uid'] or ''))}</td>"
            f"<td>{escape(e['message'])}</td></tr>"
            for e in data["errors"]
        )
        or "<tr><td colspan='5'>none</td></tr>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mammonode status</title><style>{_STYLE}</style></head>
<body><h1>mammonode {escape(__version__)} &mdash; {escape(cfg.node.ae_title)}</h1>
<p class="note">AI results are not for primary diagnosis. Times are this server's local time.
This page refreshes every 10 seconds.</p>
<h2>Failing now</h2>{_failing(data)}
{_running(data)}
<h2>Queue</h2><table><tr>{counts}</tr><tr>{values}</tr></table>
<p>jobs: {jobs}<br>deliveries: {deliveries}{notified}<br>workers alive: {alive} of {len(data["workers"])}</p>
<h2>Recent studies</h2>
<table><tr><th>Study Instance UID</th>{identity_heads}<th>state</th><th>views</th><th>missing</th>
<th>model outputs (P malignant, density)</th><th>updated</th></tr>{_study_rows(rows, phi)}</table>
<h2>Error history</h2>
<p class="note">Every warning and error, newest first, including those since resolved (what still fails
is under "Failing now").</p>
<table><tr><th>at</th><th>level</th><th>kind</th><th>study</th><th>message</th></tr>{history}</table>
</body></html>"""
