"""Safe defaults for DICOMweb: no token refuses to start unless ``dicomweb.allow_anonymous``
says so; a token over plain HTTP beyond loopback, and a config file every user may read that
holds a token, are warned about at start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from support.node import cli, write_config

from mammonode.config import Config, ConfigError, load_config
from mammonode.demo.loopback import free_port
from mammonode.web.auth import exposure_warnings, is_loopback

TOKEN = "safety-token-3b9e"


def config_file(tmp_path: Path, mode: int = 0o600, **dicomweb) -> Path:
    sections = {
        "node": {"host": "127.0.0.1", "port": free_port()},
        "dicomweb": {"enabled": True, "host": "127.0.0.1", "port": free_port(), **dicomweb},
        "storage": {"directory": str(tmp_path / "storage")},
        "worker": {"enabled": False},
        "logging": {"level": "INFO", "json": True},
    }
    path = write_config(tmp_path / "config.toml", sections)
    path.chmod(mode)
    return path


def test_shipped_defaults_start_without_http():
    cfg = Config()
    assert not cfg.dicomweb.enabled and not cfg.dicomweb.allow_anonymous


def test_no_token_refuses_to_start_in_one_line(tmp_path):
    result = cli("serve", config=config_file(tmp_path), check=False, timeout=60)
    text = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in text + result.stdout and len(text.splitlines()) == 1, text
    assert "dicomweb.token" in text and "dicomweb.allow_anonymous = true" in text
    with pytest.raises(ConfigError, match="dicomweb.token"):  # a blank token is no token
        load_config(config_file(tmp_path, token="   "), environ={})
    # The token may come from the environment; disabled DICOMweb needs none.
    assert load_config(config_file(tmp_path), environ={"MAMMONODE_DICOMWEB_TOKEN": TOKEN}).dicomweb.token == TOKEN
    assert not load_config(config_file(tmp_path, enabled=False), environ={}).dicomweb.enabled


def test_warnings_for_a_token_that_can_leak(tmp_path):
    cfg = load_config(config_file(tmp_path, mode=0o644, token=TOKEN, host="0.0.0.0"), environ={})
    clear, readable = exposure_warnings(cfg)
    assert "clear text" in clear and "0.0.0.0" in clear
    assert "readable by every user" in readable and "644" in readable and TOKEN not in clear + readable
    assert exposure_warnings(load_config(config_file(tmp_path, token=TOKEN), environ={})) == []
    cfg = load_config(config_file(tmp_path, mode=0o644, host="10.1.2.3"), environ={"MAMMONODE_DICOMWEB_TOKEN": TOKEN})
    assert [w for w in exposure_warnings(cfg) if "readable" in w] == []  # the file holds no token
    pki_like = config_file(tmp_path, mode=0o640, token=TOKEN, host="0.0.0.0", tls_cert="c.pem", tls_key="k.pem")
    assert exposure_warnings(load_config(pki_like, environ={})) == []
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("pacs.example.org")


@pytest.mark.network
def test_node_logs_the_warnings_and_serves_anonymously_only_when_allowed(node_factory):
    node = node_factory(worker={"enabled": False}, dicomweb={"token": TOKEN, "host": "0.0.0.0"})
    node.config.chmod(0o644)
    node.start()
    url = f"http://127.0.0.1:{node.web_port}/status"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).status_code == 200
    records = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    warned = [r["message"] for r in records if r["level"] == "WARNING" and "dicomweb.token" in r["message"]]
    assert len(warned) == 2 and any("clear text" in w for w in warned) and any("readable" in w for w in warned)
    assert TOKEN not in node.log()

    anonymous = node_factory(worker={"enabled": False}, dicomweb={"allow_anonymous": True}).start()
    assert requests.get(f"http://127.0.0.1:{anonymous.web_port}/status", timeout=10).status_code == 200
    assert "dicomweb.token" not in anonymous.log()
