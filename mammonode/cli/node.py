"""``serve``, ``worker`` and ``demo``: the commands that run the node."""

from __future__ import annotations

from pathlib import Path

import typer

from mammonode.cli.app import (
    ConfigOption,
    app,
    config_or_exit,
    open_db,
    setup_logging,
)


@app.command()
def serve(
    config: Path | None = ConfigOption,
    no_worker: bool = typer.Option(False, "--no-worker", help="receive only; run workers elsewhere"),
) -> None:
    """Run the node: DIMSE listener, study assembly, pipeline worker(s) and result delivery."""
    cfg = config_or_exit(config)
    setup_logging(cfg)
    from mammonode.service.node import Node

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

    cfg = config_or_exit(config)
    setup_logging(cfg)
    from mammonode.service.worker import PipelineWorker

    db = open_db(cfg)
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
def demo(
    clean: bool = typer.Option(False, "--clean", help="remove the demo directory afterwards"),
    full: bool = typer.Option(False, "--full", help="run every model, heatmaps included (minutes on a CPU)"),
    workdir: Path | None = typer.Option(None, "--workdir"),
) -> None:
    """Start a node in a temporary directory, send it a four-view study, print the results."""
    from mammonode.demo.run import run_demo

    raise typer.Exit(run_demo(clean=clean, full=full, workdir=workdir))
