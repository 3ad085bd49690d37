"""The admin CLI as a person meets it: read-only commands never create a database, UIDs are
never cut and a unique prefix is enough, dry runs say "would", and doing nothing says why."""

from __future__ import annotations

import json

from support.node import cli, write_config

from mammonode.config import load_config
from mammonode.db import open_database
from mammonode.demo.phantom import write_exam
from mammonode.ingest.store import ingest


def test_read_only_commands_never_create_a_database(tmp_path):
    config = write_config(tmp_path / "config.toml", {"storage": {"directory": str(tmp_path / "storage")}})
    for command in (("status",), ("studies",), ("study", "1.2.3")):
        result = cli(*command, config=config, check=False)
        assert result.returncode == 1, result
        assert "no database at" in result.stderr and str(config) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "storage").exists()
    data = json.loads(cli("db", "upgrade", "--json", config=config).stdout)
    assert data["revision"] == data["head"] and data["revision"]


def test_uid_prefix_uncut_uids_dry_run_and_nothing_to_retry(tmp_path):
    config = write_config(tmp_path / "config.toml", {"storage": {"directory": str(tmp_path / "storage")}})
    cfg = load_config(config, environ={})
    db = open_database(cfg)
    files = write_exam(tmp_path / "exam", shape=(650, 500), study_uid="1.2.826.0.1.3680043.99.123456789.1")
    for path in files:
        ingest(path, cfg.storage_dir, db)
    uid = "1.2.826.0.1.3680043.99.123456789.1"
    assert json.loads(cli("study", uid[:24], "--json", config=config).stdout)["study_instance_uid"] == uid
    listing = cli("studies", config=config).stdout  # piped: not a terminal
    assert any(uid in line for line in listing.splitlines()), listing
    shown = cli("studies", "--show-phi", config=config).stdout
    assert "PHANTOM01" in shown
    dry = cli("purge", "--older-than", "0", "--dry-run", config=config).stdout
    assert dry.startswith("would remove 0 studies (0.0 MB)"), dry
    nothing = cli("retry", uid[:24], config=config).stdout
    assert nothing.startswith("nothing to do: no failed deliveries"), nothing
    for path in write_exam(tmp_path / "exam2", shape=(650, 500), study_uid=uid[:-1] + "2"):
        ingest(path, cfg.storage_dir, db)
    ambiguous = cli("study", uid[:24], config=config, check=False)
    assert ambiguous.returncode == 1 and "more than one Study Instance UID" in ambiguous.stderr
