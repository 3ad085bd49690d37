"""``mammonode pull``: fetch studies from a ``[[sources]]`` PACS that the node does not hold yet."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.markup import escape

from mammonode import audit
from mammonode.cli.app import ConfigOption, app, config_or_exit, console, err, fail, open_db, print_json, setup_logging


def _client(source, cfg, db):
    if source.kind == "dicomweb":
        from mammonode.ingest.pull_dicomweb import DicomwebSourceClient

        return DicomwebSourceClient(source, cfg, db)
    from mammonode.ingest.pull_dimse import DimseSourceClient

    return DimseSourceClient(source, cfg, db)


def _how(source, cfg) -> str:
    if source.kind == "dicomweb":
        return f"DICOMweb {source.url}"
    if source.retrieve == "get":
        return f"{source.ae_title}@{source.host}:{source.port}, C-GET"
    return f"{source.ae_title}@{source.host}:{source.port}, C-MOVE to {cfg.node.ae_title}"


def _line(text: str) -> None:
    console.print(text, markup=False, highlight=False)


@app.command("pull")
def pull(
    source_name: str = typer.Option(..., "--from", help="the name of the sources entry (config.toml) to pull from"),
    studies: list[str] = typer.Option([], "--study", help="a Study Instance UID (repeatable)"),
    date_range: str | None = typer.Option(None, "--date", help="Study Date range YYYYMMDD-YYYYMMDD"),
    modality: str | None = typer.Option(None, "--modality", help="only studies (and series) of this modality, e.g. MG"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be fetched; fetch nothing"),
    as_json: bool = typer.Option(False, "--json", help="the summary as JSON"),
    config: Path | None = ConfigOption,
) -> None:
    """Find studies on a source PACS and fetch the instances this node does not hold; they
    are ingested like pushed studies (routing rules, assembly, processing). Exit 1 when
    anything failed or a --study was not found, 2 for a usage or configuration error."""
    from mammonode.ingest.pull import Fetched, PullError, PullQuery, audit_fetched, parse_date_range, plan, summarise
    from mammonode.ingest.store import valid_uid

    cfg = config_or_exit(config)
    source = next((s for s in cfg.sources if s.name == source_name), None)
    if source is None:
        known = ", ".join(s.name for s in cfg.sources) or "none"
        fail(f"--from: no source named {source_name!r} in {cfg.source} (sources configured: {known})", code=2)
    if bool(studies) == bool(date_range):
        fail("give either --study UID (one or more) or --date FROM-TO", code=2)
    for uid in studies:
        if not valid_uid(uid):
            fail(f"--study: not a valid UID: {uid!r}", code=2)
    if date_range is not None:
        try:
            date_range = parse_date_range(date_range)
        except ValueError as exc:
            fail(f"--date: {exc}", code=2)
    if modality is not None and not (modality.strip().isalnum() and len(modality.strip()) <= 16):
        fail(f"--modality: a modality code such as MG, got {modality!r}", code=2)
    setup_logging(cfg)
    # pynetdicom logs a refused association itself; the one error line below says it already.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    query = PullQuery(tuple(studies), date_range or "", (modality or "").strip().upper())
    stores_itself = source.kind == "dicomweb" or source.retrieve == "get"
    if stores_itself and not dry_run:  # C-MOVE arrivals are recorded by the node's listener
        try:
            audit.open_trail(cfg)
        except OSError as exc:
            fail(f"audit file {cfg.audit_file}: {exc.strerror or exc}", cfg)
    db = open_db(cfg)
    client = _client(source, cfg, db)
    try:
        plans, not_found = plan(client, query, db)
        if not as_json:
            _line(f"source {source.name} ({_how(source, cfg)}): {len(plans)} studies found")
            for uid in not_found:
                _line(f"  {uid}: not found on the source")
            for item in plans:
                _line(
                    f"  {item.study.study_uid} {item.study.study_date or '-'}: {len(item.instances)} instances, "
                    f"{item.held} held, {len(item.missing)} to fetch"
                )
        fetched = None
        if not dry_run and any(p.missing for p in plans):
            fetched = Fetched()
            try:
                _fetch(client, plans, fetched)
            finally:  # what was stored before a failure is audited too
                if stores_itself:
                    audit_fetched(source, fetched, "WADO-RS" if source.kind == "dicomweb" else "C-GET")
    except PullError as exc:
        fail(str(exc), cfg)
    if fetched is not None and fetched.error:  # the pull stopped; the summary says what it did
        if cfg.logging.file:
            logging.getLogger("mammonode.cli").error(fetched.error)
        err.print(f"[red]error:[/red] {escape(fetched.error)}", highlight=False)
    summary = summarise(plans, not_found, fetched)
    if as_json:
        print_json(
            {
                "source": source.name,
                "dry_run": dry_run,
                **summary.as_dict(),
                "studies": [
                    {
                        "study_instance_uid": p.study.study_uid,
                        "study_date": p.study.study_date,
                        "instances": len(p.instances),
                        "held": p.held,
                        "to_fetch": len(p.missing),
                    }
                    for p in plans
                ],
            }
        )
    else:
        wanted = sum(len(p.missing) for p in plans)
        verb = f"would fetch {wanted}" if dry_run else f"fetched {summary.fetched}"
        _line(
            f"summary: {summary.studies_found} studies found, {summary.instances} instances, {verb}, "
            f"already held {summary.already_held}, failed {summary.failed}"
        )
    if summary.failed and source.kind == "dimse" and source.retrieve == "move":
        allowed = [a.strip() for a in cfg.node.allowed_calling_aets]
        refused = (
            f" (node.allowed_calling_aets does not list {source.ae_title})"
            if allowed and source.ae_title not in allowed
            else ""
        )
        err.print(
            f"some instances failed: is the node running, and known to {source.ae_title} as "
            f"{cfg.node.ae_title} with this node's host and port?{refused}",
            markup=False,
            highlight=False,
        )
    if summary.failed or summary.not_found:
        raise typer.Exit(1)


def _fetch(client, plans, fetched) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = sum(len(p.missing) for p in plans)
    columns = (TextColumn("pulling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, disable=not err.is_terminal, transient=True) as progress:
        task = progress.add_task("pull", total=total)
        client.fetch(plans, lambda n: progress.advance(task, n), fetched)
