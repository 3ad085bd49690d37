"""``predict`` (the pipeline on one exam) and ``weights`` (install, list, verify)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from mammonode.cli.app import (
    ConfigOption,
    app,
    console,
    err,
    fail,
    optional_config,
    print_json,
    usable_device_or_exit,
    weights_app,
)

if TYPE_CHECKING:
    from mammonode.pipeline.progress import Progress


class _RichProgress:
    """A live display on a terminal: stage, units done/total, rate, elapsed and remaining."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.display = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
        )
        self.tasks: dict[str, int] = {}
        self.current = ""
        self.unit = ""

    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        if name not in self.tasks:
            self.tasks[name] = self.display.add_task(name, total=total, rate="")
        else:
            self.display.update(self.tasks[name], total=total)
        self.current, self.unit = name, unit

    def advance(self, units: int = 1) -> None:
        task_id = self.tasks[self.current]
        self.display.advance(task_id, units)
        task = self.display.tasks[task_id]
        if task.elapsed:
            self.display.update(task_id, rate=f"{task.completed / task.elapsed:.1f} {self.unit}/s")

    def stage_done(self, name: str, seconds: float) -> None:
        task = self.display.tasks[self.tasks[name]]
        total = task.total or task.completed or 1
        self.display.update(self.tasks[name], total=total, completed=total, description=f"{name} ({seconds:.1f} s)")


@contextmanager
def progress_reporter(quiet: bool) -> Iterator[Progress]:
    """Nothing with ``--quiet``; a live display when stderr is a terminal; otherwise one line
    per stage on stderr."""
    import logging
    import sys

    from mammonode.pipeline.progress import LogLines, Silent

    if quiet:
        yield Silent()
    elif err.is_terminal:
        reporter = _RichProgress()
        with reporter.display:
            yield reporter
    else:
        logger = logging.getLogger("mammonode.predict")
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        yield LogLines(logger)


@app.command()
def predict(
    files: list[Path] = typer.Argument(
        None, help="DICOM files of one exam (the four views; any of them for image-wise models only)"
    ),
    png: list[str] = typer.Option([], "--png", help="VIEW=PATH, a grey PNG as acquired (repeatable)"),
    png_mirrored: list[str] = typer.Option([], "--png-mirrored", help="VIEW whose PNG is stored mirrored"),
    weights_dir: Path | None = typer.Option(
        None, "--weights-dir", help="where the weight files are (default: the config's pipeline.weights_dir)"
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    seed: int = typer.Option(0, "--seed", help="random seed of the heatmap grids and augmentation (NYU's: 0)"),
    epochs: int = typer.Option(10, "--epochs", help="augmented passes averaged per cancer model (NYU's: 10)"),
    no_augmentation: bool = typer.Option(
        False, "--no-augmentation", help="one pass without augmentation (faster; not the published setting)"
    ),
    models: str | None = typer.Option(
        None,
        "--models",
        help="comma-separated models (default: the exam's four; also image_only_imagewise, image_heatmaps_imagewise)",
    ),
    heatmaps_out: Path | None = typer.Option(
        None, "--heatmaps-out", help="write each view's heatmaps here as .npy (float32, facing right)"
    ),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (reference) or bf16 (fast, approximate)"),
    heatmap_batch: int = typer.Option(
        0,
        "--heatmap-batch",
        min=0,
        help="patches per patch-model batch (0: 32 on a CPU, 8 when compiled, 256 on a GPU)",
    ),
    classifier_batch: int = typer.Option(
        0, "--classifier-batch", min=0, help="augmented epochs per classifier batch (0: 1 on a CPU, all on a GPU)"
    ),
    results_out: Path | None = typer.Option(None, "--results-out", help="also write SR and SC objects here"),
    allow_mixed_studies: bool = typer.Option(
        False, "--allow-mixed-studies", help="run files of different studies or patients as one exam"
    ),
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="the result as one JSON object on stdout"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display or per-stage lines on stderr"),
    compile_model: bool = typer.Option(
        False, "--compile", help="compile the patch model first (pipeline.compile; pays off over many patches)"
    ),
) -> None:
    """Run the pipeline on one exam and print the result (the node's workers call the same code).
    With only image-wise models, fewer than four views will do."""
    from mammonode.pipeline.images import ImageInputError
    from mammonode.pipeline.inputs import prepare_exam
    from mammonode.pipeline.run import DEFAULT_MODELS, PipelineOptions, run_pipeline
    from mammonode.pipeline.runtime import configure_torch
    from mammonode.pipeline.weights import WeightsError

    cfg = optional_config(config)
    if precision not in ("fp32", "bf16", "tf32"):
        fail("--precision: fp32, bf16 or tf32", code=2)
    usable_device_or_exit(device)
    if not (weights_dir or cfg.weights_dir).is_dir():
        fail(f"weights directory {weights_dir or cfg.weights_dir} not found (--weights-dir)", code=2)
    chosen = tuple(m.strip() for m in models.split(",")) if models else DEFAULT_MODELS
    options = PipelineOptions(
        weights_dir=weights_dir or cfg.weights_dir,
        device=device,
        seed=seed,
        epochs=epochs,
        augmentation=not no_augmentation,
        models=chosen,
        precision=precision,
        heatmap_batch=heatmap_batch or cfg.pipeline.heatmap_batch,
        classifier_batch=classifier_batch or cfg.pipeline.classifier_batch,
        compile=compile_model or cfg.pipeline.compile,
    )
    try:
        prepared, seconds = prepare_exam(files or [], png, png_mirrored, allow_mixed=allow_mixed_studies)
        configure_torch(options.device, options.precision)
        with progress_reporter(quiet) as progress:
            result = run_pipeline(prepared, options, {"prepare": seconds}, progress)
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
            if v.imagewise is not None:  # the image-wise pipeline's own, in the same frame (facing right)
                np.save(heatmaps_out / f"{view}_imagewise_malignant.npy", v.imagewise.malignant.astype(np.float32))
                np.save(heatmaps_out / f"{view}_imagewise_benign.npy", v.imagewise.benign.astype(np.float32))
    data = result.as_dict()
    if results_out is not None:
        data["result_files"] = _write_results(result, prepared, files or [], results_out)
    if as_json:
        print_json(data)
        return
    _print_human(data)


def _write_results(result, prepared, files: list[Path], out: Path) -> list[str]:
    from mammonode.pipeline.images import read_dicom, without_pixels
    from mammonode.reporting.objects import build_objects, sources_from_prepared
    from mammonode.reporting.uids import stable_uid

    if len(files) != 4:
        raise typer.BadParameter("--results-out needs the four views as DICOM files")
    headers = {view: without_pixels(read_dicom(Path(p.source))) for view, p in prepared.items()}
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
    for view, models in data.get("images", {}).items():
        for model, preds in models.items():
            console.print(f"  {view} {model}: " + ", ".join(f"{k}={v:.4f}" for k, v in preds.items()), highlight=False)
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
    weights_dir: Path | None = typer.Option(None, "--weights-dir", help="default: the config's pipeline.weights_dir"),
    as_json: bool = typer.Option(False, "--json", help="one JSON array, a row per model"),
) -> None:
    """Installed and missing weight files, with checksums."""
    from mammonode.pipeline.weights_admin import listing

    cfg = optional_config(config)
    rows = listing(weights_dir or cfg.weights_dir)
    if as_json:
        print_json(rows)
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
    weights_dir: Path | None = typer.Option(None, "--weights-dir", help="default: the config's pipeline.weights_dir"),
    service_user: str = typer.Option(
        "mammonode", "--service-user", help="the user the node runs as, who must be able to read the files"
    ),
    as_json: bool = typer.Option(False, "--json", help="one JSON array, a row per model"),
) -> None:
    """Load every installed file into its architecture and compare checksums with the manifest.
    Exit 1 when a file is corrupt, does not fit, contradicts a known checksum, or cannot be
    read by the service user."""
    from mammonode.pipeline.weights_admin import verify

    cfg = optional_config(config)
    rows = verify(weights_dir or cfg.weights_dir, service_user)
    if as_json:
        print_json(rows)
    else:
        for r in rows:
            console.print(f"{r['model']:24} {r['status']:10} {r['detail']}", highlight=False)
    if any(r["status"] == "bad" for r in rows):
        raise typer.Exit(1)


@weights_app.command("install")
def weights_install(
    source: str = typer.Option(..., "--from", help="a directory or a base URL holding the files"),
    config: Path | None = ConfigOption,
    weights_dir: Path | None = typer.Option(None, "--weights-dir", help="default: the config's pipeline.weights_dir"),
    test_weights: bool = typer.Option(False, "--test-weights", help="mark the installed directory as test weights"),
) -> None:
    """Copy (or download) weight files under their manifest names into the weights directory,
    readable by every user (mode 644: the service user must read them; they are no secret)."""
    from mammonode.pipeline.weights_admin import install

    cfg = optional_config(config)
    try:
        rows = install(source, weights_dir or cfg.weights_dir, test_weights)
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    for r in rows:
        console.print(f"{r['model']:24} {r['status']:10} {r['detail']}", highlight=False)
