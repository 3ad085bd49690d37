"""The CLI's shared parts: the typer apps, consoles, and loading config and database."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from mammonode import __version__
from mammonode.config import Config, ConfigError, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=f"mammonode {__version__}: AI node for screening mammography (NYU breast cancer and density models).",
)
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
weights_app = typer.Typer(no_args_is_help=True, help="Model weights: install, list, verify.")


def _print_version(value: bool) -> None:
    if value:
        console.print(f"mammonode {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    pass


app.add_typer(db_app, name="db")
app.add_typer(weights_app, name="weights")
# Piped output is read by scripts and wide editors: tables are not squeezed to 80 columns there.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1000)
err = Console(stderr=True, soft_wrap=True)

ConfigOption = typer.Option(None, "--config", "-c", help="config file (default ./config.toml or $MAMMONODE_CONFIG)")


def config_or_exit(path: Path | None) -> Config:
    from mammonode.pipeline.registry import check_selection

    try:
        cfg = load_config(path)
        try:
            check_selection(cfg.pipeline.models)
        except ValueError as exc:
            raise ConfigError(f"pipeline.models: {exc}") from None
        return cfg
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def setup_logging(cfg: Config, level: str | None = None) -> None:
    from mammonode import logs

    logs.setup(level or cfg.logging.level, cfg.logging.json, cfg.logging.file)


def open_db(cfg: Config, create: bool = False):
    """The configured database. Only ``create`` makes a new one: a read-only command run
    with the wrong config must not leave an empty database behind and report an empty node."""
    from mammonode.db import open_database
    from mammonode.db.session import is_sqlite

    if is_sqlite(cfg.database_url) and not create:
        path = Path(cfg.database_url.split("///", 1)[1])
        if not path.exists():
            fail(
                f"no database at {path} (config: {cfg.source}); start the node, "
                "or give the node's config with --config",
                cfg,
            )
    from mammonode.service.startup import StartupError, open_node_database

    try:
        return open_node_database(cfg) if create else open_database(cfg)
    except StartupError as exc:
        fail(str(exc), cfg)
    except Exception as exc:  # an unreachable PostgreSQL server, a corrupt file
        fail(f"database: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}", cfg)


def fail(message: str, cfg: Config | None = None, code: int = 1) -> NoReturn:
    """One line on stderr and exit; the log says the same once when it goes to a file (when
    it goes to stderr, that line is the log's)."""
    import logging

    if cfg is not None and cfg.logging.file:
        logging.getLogger("mammonode.cli").error(message)
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def usable_device_or_exit(name: str, cfg: Config | None = None) -> None:
    """Refuse a device that is not a device name (exit 2) or that this machine lacks (exit 1)."""
    from mammonode.pipeline.runtime import DeviceUnavailable, check_device

    try:
        check_device(name)
    except ValueError as exc:
        fail(str(exc), cfg, code=2)
    except DeviceUnavailable as exc:
        fail(str(exc), cfg)


def optional_config(path: Path | None) -> Config:
    """The config file when one is given or in the working directory, else the defaults."""
    return config_or_exit(path) if path or Path("config.toml").exists() else Config()


def study_or_exit(session, uid: str):
    """The study with this Study Instance UID, or the one whose UID starts with it."""
    from sqlalchemy import select

    from mammonode.db.models import Study
    from mammonode.db.queries import find_study

    found = find_study(session, uid)
    if found is not None:
        return found
    query = select(Study).where(Study.study_instance_uid.startswith(uid, autoescape=True)).limit(2)
    matches = list(session.execute(query).scalars())
    if len(matches) > 1:
        fail(f"{uid} is the start of more than one Study Instance UID; give more of it")
    if not matches:
        fail(f"no study {uid}")
    return matches[0]


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
