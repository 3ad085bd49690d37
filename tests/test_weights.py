"""Weight files: strict loading with clear errors, provenance, and the weights CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support.node import cli
from support.paths import need_shared

from mammonode.pipeline.models.resnet22 import LABELS
from mammonode.pipeline.registry import spec
from mammonode.pipeline.weights import WeightsError, load_model, provenance, read_state_dict

OFFICIAL_HISTOGRAM_SHA256 = "a56eb45ca5a9cd77326b0bee940291d19c7b03215c7880523181972e78f73117"  # ../shared/README.md


def test_original_files_load_strictly_in_both_densenet_spellings(test_weights_dir):
    for name in ("patch", "image_only", "image_heatmaps", "density_cnn", "density_histogram"):
        model = load_model(name, test_weights_dir)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    state = read_state_dict(test_weights_dir / "patch_model.p", spec("patch"))
    assert "features.denseblock1.denselayer1.norm1.weight" in state  # mapped from "norm.1"


def test_mismatches_are_named(tmp_path, test_weights_dir):
    state = torch.load(test_weights_dir / "image_only_model.p", weights_only=True)
    missing = dict(state["model"])
    del missing["fc1_cc.weight"]
    torch.save({"model": missing}, tmp_path / "image_only_model.p")
    with pytest.raises(WeightsError, match="missing key 'fc1_cc.weight'"):
        load_model("image_only", tmp_path)
    shaped = dict(state["model"])
    shaped["fc1_cc.bias"] = torch.zeros(3)
    torch.save({"model": shaped}, tmp_path / "image_only_model.p")
    with pytest.raises(WeightsError, match=r"fc1_cc.bias.*shape \(3,\), expected \(512,\)"):
        load_model("image_only", tmp_path)
    extra = dict(state["model"])
    extra["surprise"] = torch.zeros(1)
    torch.save({"model": extra}, tmp_path / "image_only_model.p")
    with pytest.raises(WeightsError, match="unexpected key 'surprise'"):
        load_model("image_only", tmp_path)
    torch.save(state["model"], tmp_path / "image_only_model.p")  # not wrapped in {"model": ...}
    with pytest.raises(WeightsError, match="expected a dict with key 'model'"):
        load_model("image_only", tmp_path)
    (tmp_path / "image_only_model.p").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_model("image_only", tmp_path)


def test_provenance_knows_the_official_histogram_and_test_weights(test_weights_dir):
    hist = provenance(test_weights_dir, "density_histogram")
    assert hist.sha256 == OFFICIAL_HISTOGRAM_SHA256 and hist.verified and not hist.test_weights
    cnn = provenance(test_weights_dir, "density_cnn")
    assert cnn.test_weights and not cnn.verified


def test_weights_install_list_verify(tmp_path):
    target = tmp_path / "installed"
    out = cli("weights", "install", "--from", str(need_shared("weights", "test")), "--weights-dir", str(target))
    assert "installed" in out.stdout
    cli("weights", "install", "--from", str(need_shared("weights", "official")), "--weights-dir", str(target))
    rows = {r["model"]: r for r in json.loads(cli("weights", "list", "--weights-dir", str(target), "--json").stdout)}
    assert all(r["installed"] for r in rows.values())
    assert rows["density_histogram"]["verified"] and not rows["density_histogram"]["test_weights"]
    assert rows["patch"]["test_weights"]
    verified = cli("weights", "verify", "--weights-dir", str(target), "--json")
    assert all(r["status"] == "ok" for r in json.loads(verified.stdout))
    # A corrupted file is reported, and verify fails.
    (target / "density_cnn_model.p").write_bytes(b"garbage")
    bad = cli("weights", "verify", "--weights-dir", str(target), "--json", check=False)
    assert bad.returncode == 1
    assert {r["model"]: r["status"] for r in json.loads(bad.stdout)}["density_cnn"] == "bad"


def test_install_refuses_a_file_that_contradicts_a_known_checksum(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(need_shared("weights", "test", "density_cnn_model.p"), source / "density_histogram_model.p")
    out = cli("weights", "install", "--from", str(source), "--weights-dir", str(tmp_path / "w"))
    assert "not the official" in out.stdout
    assert not (tmp_path / "w" / "density_histogram_model.p").exists()


@pytest.fixture
def request_cleanup():
    folders: list[Path] = []
    yield folders
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def test_install_leaves_files_readable_by_the_service_user_and_verify_says_when_not(request_cleanup, test_weights_dir):
    """Installed under a strict umask (077, as root's often is) the files are still 0644, so a
    service user other than the installer reads them; verify names a file it cannot read."""
    import os
    import pwd
    import stat

    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="mammonode-weights-")) / "installed"  # /tmp: others traverse it
    request_cleanup.append(target.parent)
    old = os.umask(0o077)
    try:
        out = cli("weights", "install", "--from", str(test_weights_dir), "--weights-dir", str(target))
    finally:
        os.umask(old)
    assert "installed" in out.stdout
    files = [p for p in target.iterdir() if p.suffix == ".p"]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    os.chmod(target.parent, 0o755)
    ok = cli("weights", "verify", "--weights-dir", str(target), "--service-user", "nobody", "--json")
    assert [row["status"] for row in json.loads(ok.stdout)] == ["ok"] * len(json.loads(ok.stdout))
    os.chmod(target / "patch_model.p", 0o600)
    if pwd.getpwuid(os.getuid()).pw_name == "nobody":
        pytest.skip("running as nobody")
    bad = cli("weights", "verify", "--weights-dir", str(target), "--service-user", "nobody", check=False)
    assert bad.returncode == 1
    [line] = [line for line in bad.stdout.splitlines() if line.startswith("patch ")]
    assert "bad" in line and "the service user nobody cannot read" in line and "mode 0600" in line


def test_every_cli_option_has_help_text():
    """Every option and argument of every command says what it is for (``--help`` is the manual)."""
    import click
    import typer.main

    from mammonode.cli.app import app

    def commands(group: click.Command, prefix: str = ""):
        yield prefix, group
        for name, sub in getattr(group, "commands", {}).items():
            yield from commands(sub, f"{prefix} {name}")

    missing = [
        f"{path.strip() or 'mammonode'} {param.name}"
        for path, command in commands(typer.main.get_command(app))
        for param in command.params
        if not getattr(param, "help", None) and param.name != "help"
    ]
    assert not missing, missing


def test_generated_test_weights_give_predictions_that_move_with_the_input(tmp_path):
    """The demo's weights when ../shared is absent: random weights alone give the same
    numbers for every exam (P 0.507/0.503 and one density for a phantom and a real exam
    alike), which would make the demo and any comparison blind."""
    import pydicom

    from mammonode.demo.phantom import exam_datasets
    from mammonode.pipeline.weights_admin import generate_test_weights

    models = "image_only,density_histogram,density_cnn"
    weights = generate_test_weights(tmp_path / "weights", models=tuple(models.split(",")))
    phantom = tmp_path / "phantom"
    phantom.mkdir()
    for n, ds in enumerate(exam_datasets()):
        pydicom.dcmwrite(phantom / f"{n}.dcm", ds, enforce_file_format=True)
    real = sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))
    runs = []
    for files in (sorted(phantom.glob("*.dcm")), real):
        args = [*map(str, files), "--weights-dir", str(weights), "--models", models, "--epochs", "1", "--json"]
        runs.append(json.loads(cli("predict", *args, timeout=600).stdout))
    phantom_run, real_run = runs
    cancer = [abs(phantom_run["cancer"]["image_only"][k] - real_run["cancer"]["image_only"][k]) for k in LABELS]
    assert max(cancer) > 0.05, cancer
    assert all(0.02 < p < 0.98 for p in real_run["cancer"]["image_only"].values())  # not saturated either
    for model in ("histogram", "cnn"):
        ours, theirs = phantom_run["density"][model]["probabilities"], real_run["density"][model]["probabilities"]
        assert max(abs(a - b) for a, b in zip(ours, theirs)) > 0.05, (model, ours, theirs)
    assert real_run["test_weights"] is True


def test_a_worker_cache_loads_each_model_once_and_reloads_a_replaced_file(tmp_path):
    """A long-lived worker keeps its models between exams (issue 16); ``weights install`` of a
    new file is picked up at the next run, and the result names the new file's checksum."""
    import hashlib

    from mammonode.demo.phantom import exam_datasets
    from mammonode.exam.assignment import assign_view
    from mammonode.pipeline.images import prepare_dicom
    from mammonode.pipeline.loaded import ModelCache
    from mammonode.pipeline.run import PipelineOptions, run_pipeline
    from mammonode.pipeline.weights_admin import generate_test_weights

    weights = generate_test_weights(tmp_path / "w", models=("density_histogram",), seed=1)
    prepared = {}
    for ds in exam_datasets(shape=(1000, 800)):
        view = assign_view(ds).view
        prepared[view] = prepare_dicom(view, ds, ds.SOPInstanceUID)
    options = PipelineOptions(weights_dir=weights, device="cpu", models=("density_histogram",))
    cache = ModelCache()
    first = run_pipeline(prepared, options, cache=cache)
    second = run_pipeline(prepared, options, cache=cache)
    assert first.timing_s["load_models"] > 0 and second.timing_s["load_models"] == 0.0
    assert len(cache) == 1 and second.density == first.density

    path = weights / spec("density_histogram").file
    old_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    generate_test_weights(tmp_path / "other", models=("density_histogram",), seed=2)
    shutil.copyfile(tmp_path / "other" / path.name, path)  # what `weights install` does: a new file
    third = run_pipeline(prepared, options, cache=cache)
    new_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert new_sha != old_sha and third.timing_s["load_models"] > 0 and len(cache) == 1
    assert first.models["density_histogram"].sha256 == old_sha
    assert third.models["density_histogram"].sha256 == new_sha
    assert third.density != first.density
