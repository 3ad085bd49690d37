"""The ``mammonode`` command line: the node, its workers, admin listings and the pipeline.

Each module registers its commands on the one typer app; importing this package loads them
all (and no PyTorch: commands import what they need when they run)."""

from mammonode.cli import admin, node, pipeline, pull, rules  # noqa: F401  (registers the commands)
from mammonode.cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
