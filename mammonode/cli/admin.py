"""Admin commands: the queue, studies, retry, purge, the database schema and reindex."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mammonode.cli.app import (
    ConfigOption,
    app,
    config_or_exit,
    console,
    db_app,
    err,
    open_db,
    print_json,
    setup_logging,
    study_or_exit,
)


@app.command()
def status(config: Path | None = ConfigOption, as_json: bool = typer.Option(False, "--json")) -> None:
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
    table = Table(title="studies")
    for state in data["studies"]:
        table.add_column(state)
    table.add_row(*[str(v) for v in data["studies"].values()])
    console.print(table)
    console.print("jobs: " + ", ".join(f"{k} {v}" for k, v in data["jobs"].items()))
    console.print("deliveries: " + ", ".join(f"{k} {v}" for k, v in data["deliveries"].items()))
    if data["oldest_waiting"]:
        o = data["oldest_waiting"]
        console.print(f"oldest waiting: {o['study_instance_uid']} ({o['state']} since {o['received_at']})")
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
    for e in data["errors"]:
        console.print(
            f"[yellow]{e['at']} {e['level']} {e['kind']}[/yellow] {e['study_instance_uid'] or ''} {e['message']}",
            highlight=False,
        )


@app.command()
def studies(
    config: Path | None = ConfigOption,
    state: str | None = typer.Option(None, "--state"),
    limit: int = typer.Option(50, "--limit"),
    as_json: bool = typer.Option(False, "--json"),
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
    table = Table()
    for col in ("study_instance_uid", "state", "views", "missing", "updated"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["study_instance_uid"],
            r["state"],
            " ".join(f"{k}:{v}" for k, v in r["views"].items()),
            ",".join(r["missing_views"]),
            r["updated_at"],
        )
    console.print(table)


@app.command()
def study(
    uid: str,
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json"),
    show_phi: bool = typer.Option(False, "--show-phi"),
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
        f"{', '.join(data['missing_views']) or 'none'}",
        highlight=False,
    )
    table = Table(title="instances")
    for col in ("sop_instance_uid", "view", "usable", "reason"):
        table.add_column(col)
    for i in data["instances"]:
        table.add_row(i["sop_instance_uid"], i["view"], str(i["usable"]), i["reason"] or "")
    console.print(table)
    for j in data["jobs"]:
        console.print(f"job {j['id']}: {j['state']} attempts {j['attempts']} {j['last_error'] or ''}", highlight=False)
    for r in data["results"]:
        states = ", ".join(f"{d['destination']}={d['state']}" for d in r["deliveries"]) or "no destinations"
        console.print(f"result {r['kind']}: {cfg.storage_dir / r['path']} ({states})", highlight=False)


@app.command()
def retry(
    uid: str,
    config: Path | None = ConfigOption,
    force: bool = typer.Option(False, "--force", help="also re-run done studies and re-send delivered objects"),
    as_json: bool = typer.Option(False, "--json"),
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
    if as_json:
        print_json(data)
    else:
        console.print(f"{data['deliveries_reset']} deliveries re-queued; job queued: {data['job_queued']}")


@app.command()
def purge(
    older_than: float = typer.Option(..., "--older-than", help="days since last change"),
    config: Path | None = ConfigOption,
    dry_run: bool = typer.Option(False, "--dry-run"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Remove files and rows of finished studies older than the given number of days."""
    cfg = config_or_exit(config)
    from mammonode.ingest.layout import StorageLayout
    from mammonode.service.admin import purge as purge_action

    data = purge_action(open_db(cfg), StorageLayout(cfg.storage_dir), older_than, dry_run)
    if as_json:
        print_json(data)
    else:
        console.print(
            f"removed {data['removed']} studies; {data['skipped_pending_deliveries']} kept (deliveries pending)"
        )


@db_app.command("upgrade")
def db_upgrade(config: Path | None = ConfigOption) -> None:
    """Create or migrate the database schema to the current version."""
    cfg = config_or_exit(config)
    from mammonode.db.migrate import current_revision, head_revision

    db = open_db(cfg)
    console.print(f"database at revision {current_revision(db.engine)} (head {head_revision()})")


@db_app.command("reindex")
def db_reindex(
    config: Path | None = ConfigOption,
    min_age: float = typer.Option(
        60.0, "--min-age", help="seconds; younger files under instances/ may be mid-store and are left alone"
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Record again every instance file no row refers to (under instances/ and quarantine/),
    from its header, e.g. after the database was restored from a backup or lost. The node
    may keep running."""
    cfg = config_or_exit(config)
    setup_logging(cfg, "WARNING")
    from mammonode.ingest.recovery import reindex

    data = reindex(cfg.storage_dir, open_db(cfg), min_age_s=min_age)
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
