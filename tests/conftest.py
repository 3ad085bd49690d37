"""Shared fixtures: the reference outputs, test weights, nodes as real processes, and one
full-pipeline run per input kind shared by every test that reads it. Helpers live in
tests/support/ and are imported from there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support.dicom import density_dicoms, density_png_args
from support.node import NodeProcess, cli
from support.paths import ARTIFACTS, need_shared


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads(need_shared("reference", "reference.json").read_text())


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def node_factory(tmp_path):
    nodes: list[NodeProcess] = []

    def make(**kwargs) -> NodeProcess:
        node = NodeProcess(tmp_path / f"node{len(nodes)}", **kwargs)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop(timeout=20)


@pytest.fixture(scope="session")
def test_weights_dir(tmp_path_factory) -> Path:
    """The shared seed-0 test weights plus the official histogram model, in one directory."""
    target = tmp_path_factory.mktemp("weights")
    for f in need_shared("weights", "test").iterdir():
        shutil.copy(f, target / f.name)
    shutil.copy(need_shared("weights", "official", "density_histogram_model.p"), target)
    return target


def _predict(tmp: Path, weights: Path, inputs: list[str], extra: list[str] = ()) -> dict:
    heatmaps = tmp / "heatmaps"
    out = cli(
        "predict",
        *inputs,
        "--weights-dir",
        str(weights),
        "--device",
        "cpu",
        "--heatmaps-out",
        str(heatmaps),
        *extra,
        "--json",
        timeout=1800,
    )
    data = json.loads(out.stdout)
    data["_heatmaps_dir"] = str(heatmaps)
    return data


# Every model, the image-wise ones included: the DICOM run serves the exam-level and the
# image-wise fidelity tests and the result objects (the image-wise heatmaps reuse the exam's
# where their grids coincide, and the crops, centres and loaded patch model are shared).
ALL_MODELS = "image_only,image_heatmaps,density_histogram,density_cnn,image_only_imagewise,image_heatmaps_imagewise"


@pytest.fixture(scope="session")
def dicom_run(tmp_path_factory, test_weights_dir) -> dict:
    tmp = tmp_path_factory.mktemp("predict-dicom")
    return _predict(
        tmp,
        test_weights_dir,
        [str(p) for p in density_dicoms()],
        ["--models", ALL_MODELS, "--results-out", str(tmp / "results")],
    ) | {"_results_dir": str(tmp / "results")}


@pytest.fixture(scope="session")
def png_run(tmp_path_factory, test_weights_dir) -> dict:
    """The PNGs through every stage but the patch model's: the heatmaps are the costliest
    stage of a run (about 5 of CI's minutes), and their inputs are the DICOM run's bit for
    bit (test_pipeline_fidelity proves it). The image-wise PNG checks are in
    test_imagewise_fidelity."""
    return _predict(
        tmp_path_factory.mktemp("predict-png"),
        test_weights_dir,
        density_png_args(),
        ["--models", "image_only,density_histogram,density_cnn"],
    )
