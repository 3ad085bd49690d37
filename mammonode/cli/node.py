"""``serve``, ``worker`` and ``demo``: the commands that run the node."""

from __future__ import annotations

from pathlib import Path

import typer

from mammonode.cli.app import (
    ConfigOption,
    app,
    config_or_exit,
    fail,
    setup_logging,
    usable_device_or_exit,
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
    from mammonode.service.startup import StartupError

    if not no_worker:
        from mammonode.pipeline.runtime import keep_freed_buffers

        keep_freed_buffers()  # before any thread starts (one malloc arena for the workers' threads)
    try:
        node = Node(cfg, workers=False if no_worker else None)
        if node.workers:
            usable_device_or_exit(cfg.pipeline.device)
        node.serve_forever()
    except StartupError as exc:
        fail(f"cannot start: {exc}", cfg)


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
    from mammonode.service.startup import StartupError, open_node_database
    from mammonode.service.worker import PipelineWorker, warn_missing_weights

    usable_device_or_exit(device or cfg.pipeline.device)
    from mammonode.pipeline.runtime import keep_freed_buffers

    keep_freed_buffers()  # before the worker threads start
    try:
        db = open_node_database(cfg)
    except StartupError as exc:
        fail(f"cannot start: {exc}", cfg)
    workers = [PipelineWorker(cfg, db, device=device) for _ in range(concurrency)]
    warn_missing_weights(workers[0].options)
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
    full: bool = typer.Option(False, "--full", help="run every model, heatmaps included (minutes on a CPU)"),
    workdir: Path | None = typer.Option(None, "--workdir", help="run in this directory and keep it"),
    keep: bool = typer.Option(False, "--keep", help="keep the temporary demo directory (storage, results, weights)"),
) -> None:
    """Start a node in a temporary directory, send it a four-view study, print the results."""
    from mammonode.demo.run import run_demo

    raise typer.Exit(run_demo(full=full, workdir=workdir, keep=keep))
