"""Admin commands: the queue, studies, retry, purge, the database schema and reindex."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mammonode import audit
from mammonode.cli.app import (
    ConfigOption,
    app,
    config_or_exit,
    console,
    db_app,
    err,
    fail,
    open_db,
    print_json,
    setup_logging,
    study_or_exit,
)
from mammonode.db.queries import local_time

UidArgument = typer.Argument(..., help="Study Instance UID, or a unique prefix of it")


def _where(cfg) -> str:
    from sqlalchemy.engine import make_url

    return make_url(cfg.database_url).render_as_string(hide_password=True)


def _print_scores(result: dict | None) -> None:
    """The latest result's scores and density, and which models ran."""
    if not result:
        return
    if result.get("test_weights"):
        console.print("[red]TEST WEIGHTS - NOT FOR CLINICAL USE[/red]")
    for model, preds in (result.get("cancer") or {}).items():
        console.print(
            f"{model}: P(malignant) right {preds['right_malignant']:.3f} left {preds['left_malignant']:.3f}; "
            f"P(benign) right {preds['right_benign']:.3f} left {preds['left_benign']:.3f}",
            highlight=False,
        )
    for view, models in (result.get("images") or {}).items():
        for model, preds in models.items():
            console.print(
                f"{view} {model}: P(malignant) {preds['malignant']:.3f}; P(benign) {preds['benign']:.3f}",
                highlight=False,
            )
    for model, dens in (result.get("density") or {}).items():
        probs = " ".join(f"{c}={p:.2f}" for c, p in zip("abcd", dens["probabilities"]))
        # markup=False: rich would read "[a=0.08 …]" as a style tag and drop it.
        console.print(f"density ({model}): BI-RADS {dens['category']} [{probs}]", highlight=False, markup=False)
    ran = ", ".join(result.get("models") or {}) or "none"
    console.print(f"models run: {ran} (device {result.get('device')})", highlight=False)
    for name, reason in (result.get("skipped") or {}).items():
        console.print(f"[yellow]not run: {name}: {reason}[/yellow]", highlight=False)


@app.command()
def status(
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="machine-readable JSON (the documented schema)"),
) -> None:
    """Queue overview: studies and jobs per state, workers, deliveries, recent errors."""
    cfg = config_or_exit(config)
    from mammonode.db.queries import status as status_query
    from mammonode.ingest.layout import StorageLayout

    layout = StorageLayout(cfg.storage_dir)
    with open_db(cfg).session() as session:
        data = status_query(
            session, cfg.study.quiet_period_s, cfg.worker.stale_after_s, quarantined_files=layout.quarantined_count()
        )
    if as_json:
        print_json(data)
        return
    console.print(f"config: {cfg.source}; database: {_where(cfg)}", highlight=False)
    table = Table(title="studies")
    for state in data["studies"]:
        table.add_column(state)
    table.add_row(*[str(v) for v in data["studies"].values()])
    console.print(table)
    console.print("jobs: " + ", ".join(f"{k} {v}" for k, v in data["jobs"].items()))
    for r in data["running"]:
        console.print(
            f"  running: {r['study_instance_uid']} stage {r['stage'] or 'starting'} "
            f"(since {local_time(r['started_at'])})",
            highlight=False,
        )
    console.print("deliveries: " + ", ".join(f"{k} {v}" for k, v in data["deliveries"].items()))
    if any(data["commitments"].values()):
        console.print("storage commitment: " + ", ".join(f"{k} {v}" for k, v in data["commitments"].items()))
    if any(data["notifications"].values()):
        console.print("notifications: " + ", ".join(f"{k} {v}" for k, v in data["notifications"].items()))
    if data["oldest_waiting"]:
        o = data["oldest_waiting"]
        console.print(
            f"oldest waiting: {o['study_instance_uid']} ({o['state']} since {local_time(o['received_at'])})",
            highlight=False,
        )
    alive = [w for w in data["workers"] if w["alive"]]
    console.print(f"workers alive: {len(alive)} of {len(data['workers'])} known")
    if data["quarantined_files"]:
        console.print(
            f"[yellow]{data['quarantined_files']} files in {layout.quarantine_dir}[/yellow] (no row refers to them; "
            "`mammonode db reindex` records them again)",
            highlight=False,
        )
    if data["quarantined_instances"]:
        console.print(f"[yellow]{data['quarantined_instances']} instances of another patient than their study[/yellow]")
    now = data["failing"]
    if now["deliveries"] or now["studies"] or now["commitments"] or now["notifications"]:
        console.print("[bold red]failing now[/bold red]")
    for d in now["deliveries"]:
        retry = f", next try {local_time(d['next_attempt_at'])}" if d["next_attempt_at"] else ""
        console.print(
            f"  [red]delivery to {d['destination']}[/red]: {d['failed']} failed, {d['retrying']} retrying "
            f"({d['studies']} studies{retry}): {d['last_error']}",
            highlight=False,
        )
    for c in now["commitments"]:
        console.print(
            f"  [red]storage commitment by {c['destination']}[/red]: {c['timeouts']} commit-timeout "
            f"({c['studies']} studies; `mammonode retry UID` sends and asks again): {c['last_error']}",
            highlight=False,
        )
    for n in now["notifications"]:
        retry = f", next try {local_time(n['next_attempt_at'])}" if n["next_attempt_at"] else ""
        console.print(
            f"  [red]notifications to {n['hook']}[/red]: {n['failed']} failed, {n['retrying']} retrying{retry} "
            f"(`mammonode notifications --hook {n['hook']}`): {n['last_error']}",
            highlight=False,
        )
    for f in now["studies"]:
        console.print(
            f"  [red]study {f['study_instance_uid']}[/red] failed {local_time(f['since'])}: {f['error']}",
            highlight=False,
        )
    if data["errors"]:
        console.print("recent errors and warnings (history, resolved ones included)")
    for e in data["errors"]:
        console.print(
            f"  [dim]{local_time(e['at'])} {e['level']} {e['kind']}[/dim] "
            f"{e['study_instance_uid'] or ''} {e['message']}",
            highlight=False,
        )


@app.command()
def notifications(
    config: Path | None = ConfigOption,
    hook: str | None = typer.Option(None, "--hook", help="only this hook (also one no longer configured)"),
    state: str | None = typer.Option(
        None, "--state", help="only sends in this state: pending, sending, delivered, failed"
    ),
    limit: int = typer.Option(50, "--limit", min=1, help="at most this many, newest first"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable JSON (the documented schema)"),
) -> None:
    """Webhook sends ([[notify]]), newest event first: state, attempts, the last answer."""
    from mammonode.db.models import DeliveryState
    from mammonode.db.queries import notifications as notifications_query

    cfg = config_or_exit(config)
    if state is not None and state not in (s for s in DeliveryState.ALL if s != DeliveryState.SUPERSEDED):
        fail(f"--state: {state!r} is not one of pending, sending, delivered, failed", code=2)
    with open_db(cfg).session() as session:
        rows = notifications_query(session, hook, state, limit)
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no notifications" + (" matching" if hook or state else ""))
        return
    table = Table()
    for column in ("event time", "hook", "event", "study", "state", "attempts", "last answer"):
        table.add_column(column)
    for r in rows:
        answer = r["last_error"] or (f"HTTP {r['last_status']}" if r["last_status"] else "")
        if r["next_attempt_at"]:
            answer += f" (next try {local_time(r['next_attempt_at'])})"
        colour = {"failed": "red", "delivered": "green"}.get(r["state"], "yellow")
        table.add_row(
            local_time(r["occurred_at"]),
            r["hook"],
            r["event"],
            r["study_instance_uid"] or "",
            f"[{colour}]{r['state']}[/{colour}]",
            str(r["attempts"]),
            answer,
        )
    console.print(table)


@app.command()
def studies(
    config: Path | None = ConfigOption,
    state: str | None = typer.Option(None, "--state", help="only studies in this state"),
    limit: int = typer.Option(50, "--limit", help="at most this many studies, newest first"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable JSON (the documented schema)"),
    show_phi: bool = typer.Option(False, "--show-phi", help="include patient ID and name"),
) -> None:
    """Recent studies with their state and views."""
    cfg = config_or_exit(config)
    from mammonode.db.models import StudyState
    from mammonode.db.queries import list_studies

    if state is not None and state not in StudyState.ALL:
        err.print(f"unknown state {state!r}; one of {', '.join(StudyState.ALL)}")
        raise typer.Exit(2)
    with open_db(cfg).session() as session:
        rows = list_studies(session, cfg.study.quiet_period_s, state, limit, show_phi)
    if as_json:
        print_json(rows)
        return
    # The UID is never cut (it is what one copies); the other columns wrap instead.
    table = Table()
    widest = max((len(r["study_instance_uid"]) for r in rows), default=20)
    table.add_column("study_instance_uid", no_wrap=True, min_width=widest)
    for col in ("state", "views", "missing", "updated"):
        table.add_column(col, overflow="fold")
    phi = ("patient_name", "patient_id", "accession_number", "study_date") if show_phi else ()
    for col in phi:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["study_instance_uid"],
            r["state"],
            " ".join(f"{k}:{v}" for k, v in r["views"].items()),
            ",".join(r["missing_views"]),
            local_time(r["updated_at"]),
            *[r.get(col) or "" for col in phi],
        )
    console.print(table)


@app.command()
def study(
    uid: str = UidArgument,
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="machine-readable JSON (the documented schema)"),
    show_phi: bool = typer.Option(False, "--show-phi", help="include patient name and ID, accession, study date"),
) -> None:
    """One study: instances and view assignments, jobs, results and deliveries."""
    cfg = config_or_exit(config)
    from mammonode.db.queries import study_detail

    with open_db(cfg).session() as session:
        found = study_or_exit(session, uid)
        data = study_detail(session, found, cfg.study.quiet_period_s, show_phi)
    if as_json:
        print_json(data)
        return
    console.print(
        f"[bold]{data['study_instance_uid']}[/bold]  state {data['state']}  missing "
        f"{', '.join(data['missing_views']) or 'none'}  updated {local_time(data['updated_at'])}",
        highlight=False,
    )
    if show_phi:
        console.print(
            "patient {} ({}), accession {}, study date {}".format(
                *(data.get(k) or "-" for k in ("patient_name", "patient_id", "accession_number", "study_date"))
            ),
            highlight=False,
        )
    if data.get("note"):
        console.print(f"[yellow]{data['note']}[/yellow]", highlight=False)
    table = Table(title="instances")
    for col in ("sop_instance_uid", "view", "usable", "rule", "reason"):
        table.add_column(col)
    for i in data["instances"]:
        table.add_row(i["sop_instance_uid"], i["view"], str(i["usable"]), i["rule"] or "", i["reason"] or "")
    console.print(table)
    for j in data["jobs"]:
        stage = f" (stage: {j['stage']})" if j.get("stage") else ""
        console.print(
            f"job {j['id']}: {j['state']}{stage} attempts {j['attempts']} {j['last_error'] or ''}", highlight=False
        )
    _print_scores(data.get("result"))
    for r in data["results"]:
        states = ", ".join(f"{d['destination']}={d['state']}" for d in r["deliveries"]) or "kept here, not sent"
        console.print(f"result {r['kind']}: {cfg.storage_dir / r['path']} ({states})", highlight=False)


def _audit_admin(cfg, study_uid: str, patient_id: str, action: str) -> None:
    """110103 for an admin action that has a study's instances run (and results sent) again."""
    audit.open_trail(cfg)
    ctx = audit.context()
    study = audit.StudyObjects(study_uid, patient_id)
    audit.emit(audit.messages.instances_accessed(ctx.source, ctx.local_user(), study, action))


@app.command()
def retry(
    uid: str = UidArgument,
    config: Path | None = ConfigOption,
    force: bool = typer.Option(False, "--force", help="also re-run done studies and re-send delivered objects"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable JSON (the documented schema)"),
) -> None:
    """Re-send failed deliveries and re-queue a failed study."""
    cfg = config_or_exit(config)
    from mammonode.db.admin import retry as retry_action

    with open_db(cfg).session() as session:
        found = study_or_exit(session, uid)
        try:
            data = retry_action(session, found, force)
        except ValueError as exc:
            err.print(str(exc))
            raise typer.Exit(1) from None
        patient_id, study_uid = found.patient_id or "", found.study_instance_uid
    if data["deliveries_reset"] or data["job_queued"]:
        _audit_admin(cfg, study_uid, patient_id, "mammonode retry" + (" --force" if force else ""))
    if as_json:
        print_json(data)
    elif data["deliveries_reset"] or data["job_queued"]:
        queued = "; the study is queued to run again" if data["job_queued"] else ""
        console.print(f"{data['deliveries_reset']} deliveries will be sent again{queued}", highlight=False)
    else:
        console.print(
            f"nothing to do: no failed deliveries, and the study is {found.state}, not failed "
            "(--force re-runs a done or incomplete study and re-sends delivered objects)",
            highlight=False,
        )


@app.command()
def process(
    uid: str = UidArgument,
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="machine-readable JSON (the documented schema)"),
) -> None:
    """Run a waiting (receiving or incomplete) study now with the views it has: all four run
    the full pipeline, fewer the image-wise models (a partial result). A running node's
    worker picks the job up."""
    cfg = config_or_exit(config)
    from mammonode.db.assembly import process as process_action

    with open_db(cfg).session() as session:
        found = study_or_exit(session, uid)
        try:
            data = process_action(session, found)
        except ValueError as exc:
            err.print(str(exc), highlight=False)
            raise typer.Exit(1) from None
        patient_id, study_uid = found.patient_id or "", found.study_instance_uid
    _audit_admin(cfg, study_uid, patient_id, "mammonode process")
    if as_json:
        print_json(data)
    elif data["partial"]:
        console.print(
            f"queued {data['study_instance_uid']} for a partial result (image-wise models); "
            f"missing views: {', '.join(data['missing_views'])}",
            highlight=False,
        )
    else:
        console.print(f"queued {data['study_instance_uid']} (all four views)", highlight=False)


@app.command()
def purge(
    older_than: float = typer.Option(..., "--older-than", help="days since last change"),
    config: Path | None = ConfigOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would be removed, remove nothing"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable JSON (the documented schema)"),
) -> None:
    """Remove files and rows of finished studies older than the given number of days."""
    cfg = config_or_exit(config)
    from mammonode.ingest.layout import StorageLayout
    from mammonode.service.admin import purge as purge_action

    audit.open_trail(cfg)  # the purge records one 110105 per study removed
    data = purge_action(open_db(cfg), StorageLayout(cfg.storage_dir), older_than, dry_run)
    if as_json:
        print_json(data)
    else:
        verb = "would remove" if dry_run else "removed"
        console.print(
            f"{verb} {data['removed']} studies ({data['bytes'] / 1e6:.1f} MB); "
            f"{data['skipped_pending_deliveries']} kept (deliveries pending)",
            highlight=False,
        )


@db_app.command("upgrade")
def db_upgrade(
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="machine-readable JSON (the documented schema)"),
) -> None:
    """Create or migrate the database schema to the current version."""
    cfg = config_or_exit(config)
    from mammonode.db.migrate import current_revision, head_revision

    db = open_db(cfg, create=True)
    data = {"database": _where(cfg), "revision": current_revision(db.engine), "head": head_revision()}
    if as_json:
        print_json(data)
    else:
        console.print(f"database {data['database']} at revision {data['revision']} (head {data['head']})")


@db_app.command("reindex")
def db_reindex(
    config: Path | None = ConfigOption,
    min_age: float = typer.Option(
        60.0, "--min-age", help="seconds; younger files under instances/ may be mid-store and are left alone"
    ),
    as_json: bool = typer.Option(False, "--json", help="machine-readable JSON (the documented schema)"),
) -> None:
    """Record again every instance file no row refers to (under instances/ and quarantine/),
    from its header, e.g. after the database was restored from a backup or lost. The node
    may keep running. The [[rules]] decide again which instances are held (a file a drop
    rule now matches is held, never deleted)."""
    cfg = config_or_exit(config)
    setup_logging(cfg, "WARNING")
    from mammonode.ingest.recovery import reindex

    data = reindex(cfg.storage_dir, open_db(cfg, create=True), min_age_s=min_age, rules=cfg.rules)
    if as_json:
        print_json(data)
        return
    console.print(
        f"recorded {data['recorded']}, restored from quarantine {data['restored']}, unchanged {data['unchanged']}; "
        f"kept in quarantine: {data['superseded']} older versions, {data['refused']} refused "
        f"({data['quarantined_files']} files there); {data['recent']} too recent; "
        f"{data['rows_without_file']} rows without a file",
        highlight=False,
    )
