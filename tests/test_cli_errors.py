"""Mistakes an operator makes end in one clear line on stderr and a meaningful exit code
(2: usage or configuration, 1: the machine or a peer), never a traceback."""

from __future__ import annotations

import socket

import pytest
from support.node import cli, write_config
from support.paths import need_shared

from mammonode.demo.loopback import free_port


def one_line_error(result, code: int, *words: str) -> str:
    text = result.stderr.strip()
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in text and "Traceback" not in result.stdout
    assert len(text.splitlines()) == 1, text
    for word in words:
        assert word in text, text
    return text


def node_config(tmp_path, **sections):
    base = {
        "node": {"host": "127.0.0.1", "port": free_port()},
        "dicomweb": {"enabled": True, "allow_anonymous": True, "host": "127.0.0.1", "port": free_port()},
        "storage": {"directory": str(tmp_path / "storage")},
        "worker": {"enabled": False},
        "logging": {"level": "WARNING"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return write_config(tmp_path / "config.toml", base)


@pytest.mark.parametrize("which", ["node", "dicomweb"])
def test_port_in_use_refuses_to_start(tmp_path, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = node_config(tmp_path, **{which: {"port": port}})
        result = cli("serve", config=config, check=False, timeout=60)
    one_line_error(result, 1, "cannot start", f"127.0.0.1:{port}", "in use")


def test_storage_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = node_config(tmp_path, storage={"directory": str(blocker / "storage")})
    one_line_error(cli("serve", config=config, check=False, timeout=60), 1, "storage directory")


def test_unreachable_database(tmp_path):
    url = f"postgresql+psycopg://mammonode:secret@127.0.0.1:{free_port()}/mammonode"
    config = node_config(tmp_path, database={"url": url})
    line = one_line_error(cli("serve", config=config, check=False, timeout=60), 1, "database", "127.0.0.1")
    assert "secret" not in line


def test_devices_that_are_not_devices_or_not_here(tmp_path):
    dicoms = [str(p) for p in sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))]
    weights = tmp_path / "weights"
    weights.mkdir()
    one_line_error(cli("predict", *dicoms, "--weights-dir", str(weights), "--device", "gpu", check=False), 2, "gpu")
    import torch

    if not torch.cuda.is_available():
        args = ("predict", *dicoms, "--weights-dir", str(weights), "--device", "cuda")
        one_line_error(cli(*args, check=False), 1, "CUDA is not available")
        config = node_config(tmp_path)
        one_line_error(cli("worker", "--device", "cuda", config=config, check=False, timeout=60), 1, "CUDA")


def test_missing_weights_directory_is_an_error(tmp_path):
    dicoms = [str(p) for p in sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))]
    result = cli("predict", *dicoms, "--weights-dir", str(tmp_path / "typo"), check=False)
    one_line_error(result, 2, "weights directory", "typo")


def test_predict_refuses_views_of_two_studies(tmp_path):
    exam = sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))
    other = sorted(need_shared("samples", "dicom", "nyu1-cc").glob("*.dcm"))
    weights = tmp_path / "weights"
    weights.mkdir()
    args = [str(p) for p in exam[:2] + other[:1]]
    result = cli("predict", *args, "--weights-dir", str(weights), check=False)
    one_line_error(result, 1, "2 different studies", "--allow-mixed-studies")


def test_version():
    from mammonode import __version__

    assert cli("--version").stdout.strip() == f"mammonode {__version__}"


def test_missing_weights_are_warned_once_at_start(node_factory):
    node = node_factory(pipeline={"models": ["image_only", "density_cnn"]}, worker={"concurrency": 2}).start()
    lines = node.wait_for(
        lambda: [line for line in node.log().splitlines() if "configured models that will not run" in line],
        30,
        what="the missing-weights warning",
    )
    assert len(lines) == 1, lines
    assert "image_only_model.p" in lines[0] and "density_cnn_model.p" in lines[0] and '"WARNING"' in lines[0]


def test_predict_reports_each_stage_on_stderr_unless_quiet(tmp_path):
    """stderr is not a terminal here, so the progress display becomes one line per stage."""
    dicoms = [str(p) for p in sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))]
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "density_histogram_model.p").write_bytes(
        need_shared("weights", "official", "density_histogram_model.p").read_bytes()
    )
    args = ("predict", *dicoms, "--weights-dir", str(weights), "--models", "density_histogram", "--json")
    lines = cli(*args).stderr.splitlines()
    for stage in ("crop", "centers", "density"):
        assert any(line.startswith(f"stage {stage} done in ") for line in lines), lines
    assert cli(*args, "--quiet").stderr.strip() == ""
