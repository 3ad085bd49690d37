"""``mammonode rules``: which routing rule ([[rules]]) a file would fall under, and why."""

from __future__ import annotations

from pathlib import Path

import typer

from mammonode.cli.app import ConfigOption, app, config_or_exit, console, fail, print_json

rules_app = typer.Typer(no_args_is_help=True, help="Routing rules ([[rules]]): check what they do.")
app.add_typer(rules_app, name="rules")


def _route(path: Path, rules, calling_ae: str | None) -> dict:
    from mammonode.ingest.rules import match
    from mammonode.ingest.store import StoreError, read_header

    try:
        ds = read_header(path)
    except StoreError as exc:
        return {"file": str(path), "error": exc.comment}
    found = match(rules, ds, calling_ae)
    return {
        "file": str(path),
        "rule": found.rule.name,
        "index": found.index,
        "action": found.action,
        "reasons": list(found.reasons),
        "passed_over": [{"index": i, "rule": name, "why_not": why} for i, name, why in found.passed_over],
    }


@rules_app.command("test")
def rules_test(
    files: list[Path] = typer.Argument(..., help="DICOM files"),
    config: Path | None = ConfigOption,
    calling_ae: str | None = typer.Option(
        None, "--calling-ae", help="the calling AE title to assume (default: none, as for STOW-RS)"
    ),
    as_json: bool = typer.Option(False, "--json", help="machine-readable JSON"),
) -> None:
    """Print the rule each file matches (first match wins), its action and the conditions
    that held; the earlier rules and why each did not match. Exit 1 if a file is unreadable."""
    cfg = config_or_exit(config)
    if calling_ae is not None and not 0 < len(calling_ae.strip()) <= 16:
        fail(f"--calling-ae: an AE title is 1-16 characters, got {calling_ae!r}", code=2)
    for path in files:
        if not path.is_file():
            fail(f"{path}: no such file", code=2)
    rows = [_route(path, cfg.rules, calling_ae.strip() if calling_ae else None) for path in files]
    if as_json:
        print_json(rows)
    else:
        for row in rows:
            if "error" in row:
                console.print(f"{row['file']}: error: {row['error']}", markup=False, highlight=False)
                continue
            console.print(
                f"{row['file']}: rule {row['rule']!r} (rules[{row['index']}]), action {row['action']}",
                markup=False,
                highlight=False,
            )
            for reason in row["reasons"]:
                console.print(f"  matched: {reason}", markup=False, highlight=False)
            for skipped in row["passed_over"]:
                console.print(
                    f"  not rules[{skipped['index']}] {skipped['rule']!r}: {skipped['why_not']}",
                    markup=False,
                    highlight=False,
                )
    if any("error" in row for row in rows):
        raise typer.Exit(1)
