"""The ``mammonode`` command line: the node, its workers, admin listings and the pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mammonode import __version__
from mammonode.config import Config, ConfigError, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=f"mammonode {__version__}: AI node for screening mammography (NYU breast cancer and density models).",
)
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
weights_app = typer.Typer(no_args_is_help=True, help="Model weights: install, list, verify.")
app.add_typer(db_app, name="db")
app.add_typer(weights_app, name="weights")
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOption = typer.Option(None, "--config", "-c", help="config file (default ./config.toml or $MAMMONODE_CONFIG)")


def _config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _setup_logging(cfg: Config, level: str | None = None) -> None:
    from mammonode import logs

    logs.setup(level or cfg.logging.level, cfg.logging.json, cfg.logging.file)


def _db(cfg: Config):
    from mammonode.db import open_database

    return open_database(cfg)


def _study_or_exit(session, uid: str):
    from mammonode.db.queries import find_study

    found = find_study(session, uid)
    if found is None:
        err.print(f"no study {uid}")
        raise typer.Exit(1)
    return found


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def serve(
    config: Path | None = ConfigOption,
    no_worker: bool = typer.Option(False, "--no-worker", help="receive only; run workers elsewhere"),
) -> None:
    """Run the node: DIMSE listener, study assembly, pipeline worker(s) and result delivery."""
    cfg = _config(config)
    _setup_logging(cfg)
    from mammonode.node import Node

    Node(cfg, workers=False if no_worker else None).serve_forever()


@app.command()
def worker(
    config: Path | None = ConfigOption,
    concurrency: int = typer.Option(1, "--concurrency", "-n", min=1, help="pipeline workers in this process"),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:K"),
) -> None:
    """Run pipeline workers only, against the configured database."""
    import signal
    import threading

    cfg = _config(config)
    _setup_logging(cfg)
    from mammonode.worker import PipelineWorker

    db = _db(cfg)
    workers = [PipelineWorker(cfg, db, device=device) for _ in range(concurrency)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for t in threads:
        t.start()
    stop.wait()
    for w in workers:
        w.stop()


@app.command()
def status(config: Path | None = ConfigOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Queue overview: studies and jobs per state, workers, deliveries, recent errors."""
    cfg = _config(config)
    from mammonode.db.queries import status as status_query

    with _db(cfg).session() as session:
        data = status_query(session, cfg.study.quiet_period_s, cfg.worker.stale_after_s)
    if as_json:
        _print_json(data)
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
    cfg = _config(config)
    from mammonode.db.models import StudyState
    from mammonode.db.queries import list_studies

    if state is not None and state not in StudyState.ALL:
        err.print(f"unknown state {state!r}; one of {', '.join(StudyState.ALL)}")
        raise typer.Exit(2)
    with _db(cfg).session() as session:
        rows = list_studies(session, cfg.study.quiet_period_s, state, limit, show_phi)
    if as_json:
        _print_json(rows)
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
    cfg = _config(config)
    from mammonode.db.queries import study_detail

    with _db(cfg).session() as session:
        found = _study_or_exit(session, uid)
        data = study_detail(session, found, cfg.study.quiet_period_s, show_phi)
    if as_json:
        _print_json(data)
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
    cfg = _config(config)
    from mammonode.db.queries import retry as retry_action

    with _db(cfg).session() as session:
        found = _study_or_exit(session, uid)
        try:
            data = retry_action(session, found, force)
        except ValueError as exc:
            err.print(str(exc))
            raise typer.Exit(1) from None
    if as_json:
        _print_json(data)
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
    cfg = _config(config)
    from mammonode.db.queries import purge as purge_action

    with _db(cfg).session() as session:
        data = purge_action(session, cfg.storage_dir, older_than, dry_run)
    if as_json:
        _print_json(data)
    else:
        console.print(
            f"removed {data['removed']} studies; {data['skipped_pending_deliveries']} kept (deliveries pending)"
        )


@db_app.command("upgrade")
def db_upgrade(config: Path | None = ConfigOption) -> None:
    """Create or migrate the database schema to the current version."""
    cfg = _config(config)
    from mammonode.db.migrate import current_revision, head_revision

    db = _db(cfg)
    console.print(f"database at revision {current_revision(db.engine)} (head {head_revision()})")


@app.command()
def predict(
    files: list[Path] = typer.Argument(None, help="DICOM files of one exam (the four views)"),
    png: list[str] = typer.Option([], "--png", help="VIEW=PATH, a grey PNG as acquired (repeatable)"),
    png_mirrored: list[str] = typer.Option([], "--png-mirrored", help="VIEW whose PNG is stored mirrored"),
    weights_dir: Path | None = typer.Option(None, "--weights-dir"),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed"),
    epochs: int = typer.Option(10, "--epochs"),
    no_augmentation: bool = typer.Option(False, "--no-augmentation"),
    models: str | None = typer.Option(None, "--models", help="comma-separated subset of the models"),
    heatmaps_out: Path | None = typer.Option(None, "--heatmaps-out"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (reference) or bf16 (fast, approximate)"),
    heatmap_batch: int = typer.Option(8, "--heatmap-batch"),
    results_out: Path | None = typer.Option(None, "--results-out", help="also write SR and SC objects here"),
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the pipeline on one exam and print the result (the node's workers call the same code)."""
    from mammonode.pipeline.images import ImageInputError
    from mammonode.pipeline.inputs import prepare_exam
    from mammonode.pipeline.run import DEFAULT_MODELS, PipelineOptions, run_pipeline
    from mammonode.pipeline.weights import WeightsError

    cfg = _config(config) if config or Path("config.toml").exists() else Config()
    if precision not in ("fp32", "bf16", "tf32"):
        err.print("--precision: fp32, bf16 or tf32")
        raise typer.Exit(2)
    chosen = tuple(m.strip() for m in models.split(",")) if models else DEFAULT_MODELS
    options = PipelineOptions(
        weights_dir=weights_dir or cfg.weights_dir,
        device=device,
        seed=seed,
        epochs=epochs,
        augmentation=not no_augmentation,
        models=chosen,
        precision=precision,
        heatmap_batch=heatmap_batch,
    )
    try:
        prepared, seconds = prepare_exam(files or [], png, png_mirrored)
        result = run_pipeline(prepared, options, {"prepare": seconds})
    except (ImageInputError, WeightsError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if heatmaps_out is not None:
        import numpy as np

        heatmaps_out.mkdir(parents=True, exist_ok=True)
        for view, v in result.views.items():
            if v.heatmap_malignant is not None:
                np.save(heatmaps_out / f"{view}_malignant.npy", v.heatmap_malignant.astype(np.float32))
                np.save(heatmaps_out / f"{view}_benign.npy", v.heatmap_benign.astype(np.float32))
    data = result.as_dict()
    if results_out is not None:
        data["result_files"] = _write_results(result, prepared, files or [], results_out)
    if as_json:
        _print_json(data)
        return
    _print_human(data)


def _write_results(result, prepared, files: list[Path], out: Path) -> list[str]:
    from mammonode.dicom_out.results import build_objects, sources_from_prepared
    from mammonode.dicom_out.uids import stable_uid
    from mammonode.pipeline.images import read_dicom

    if len(files) != 4:
        raise typer.BadParameter("--results-out needs the four views as DICOM files")
    headers = {}
    for view, p in prepared.items():
        ds = read_dicom(Path(p.source))
        if "PixelData" in ds:
            del ds.PixelData
        headers[view] = ds
    key = stable_uid(result.study_instance_uid or "", "predict", "cli")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for obj in build_objects(result, sources_from_prepared(prepared, headers), result.study_instance_uid, key):
        path = out / f"{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        written.append(str(path))
    return written


def _print_human(data: dict) -> None:
    notice = " [red](TEST WEIGHTS - NOT FOR CLINICAL USE)[/red]" if data.get("test_weights") else ""
    console.print(f"study {data['study_instance_uid']}{notice}", highlight=False)
    for model, preds in data["cancer"].items():
        console.print(f"  {model}: " + ", ".join(f"{k}={v:.4f}" for k, v in preds.items()), highlight=False)
    for model, d in data["density"].items():
        console.print(
            f"  density {model}: category {d['category']} " + str([round(p, 4) for p in d["probabilities"]]),
            highlight=False,
        )
    for name, reason in data.get("skipped", {}).items():
        console.print(f"  [yellow]skipped {name}: {reason}[/yellow]", highlight=False)
    console.print("  timing: " + ", ".join(f"{k} {v:.1f}s" for k, v in data["timing_s"].items()), highlight=False)


@weights_app.command("list")
def weights_list(
    config: Path | None = ConfigOption,
    weights_dir: Path | None = typer.Option(None, "--weights-dir"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Installed and missing weight files, with checksums."""
    from mammonode.weights_tool import listing

    cfg = _config(config) if config or Path("config.toml").exists() else Config()
    rows = listing(weights_dir or cfg.weights_dir)
    if as_json:
        _print_json(rows)
        return
    table = Table()
    for col in ("model", "file", "installed", "sha256", "verified", "test"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["model"],
            r["file"],
            str(r["installed"]),
            (r["sha256"] or "")[:16],
            str(r["verified"]),
            str(r["test_weights"]),
        )
    console.print(table)


@weights_app.command("verify")
def weights_verify(
    config: Path | None = ConfigOption,
    weights_dir: Path | None = typer.Option(None, "--weights-dir"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Load every installed file into its architecture and compare checksums with the manifest.
    Exit 1 when a file is corrupt, does not fit, or contradicts a known checksum."""
    from mammonode.weights_tool import verify

    cfg = _config(config) if config or Path("config.toml").exists() else Config()
    rows = verify(weights_dir or cfg.weights_dir)
    if as_json:
        _print_json(rows)
    else:
        for r in rows:
            console.print(f"{r['model']:18} {r['status']:10} {r['detail']}", highlight=False)
    if any(r["status"] == "bad" for r in rows):
        raise typer.Exit(1)


@weights_app.command("install")
def weights_install(
    source: str = typer.Option(..., "--from", help="a directory or a base URL holding the files"),
    config: Path | None = ConfigOption,
    weights_dir: Path | None = typer.Option(None, "--weights-dir"),
    test_weights: bool = typer.Option(False, "--test-weights", help="mark the installed directory as test weights"),
) -> None:
    """Copy (or download) weight files under their manifest names into the weights directory."""
    from mammonode.weights_tool import install

    cfg = _config(config) if config or Path("config.toml").exists() else Config()
    try:
        rows = install(source, weights_dir or cfg.weights_dir, test_weights)
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    for r in rows:
        console.print(f"{r['model']:18} {r['status']:10} {r['detail']}", highlight=False)


@app.command()
def demo(
    clean: bool = typer.Option(False, "--clean", help="remove the demo directory afterwards"),
    full: bool = typer.Option(False, "--full", help="run every model, heatmaps included (minutes on a CPU)"),
    workdir: Path | None = typer.Option(None, "--workdir"),
) -> None:
    """Start a node in a temporary directory, send it a four-view study, print the results."""
    from mammonode.demo import run_demo

    raise typer.Exit(run_demo(clean=clean, full=full, workdir=workdir))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
