"""The patch model compiled once per worker (pipeline.compile): the same softmax as the
uncompiled model within float reassociation, one compiled shape for every batch (the last
one padded), and a machine without a C++ compiler gets the uncompiled model and a WARNING,
never a failed job."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from mammonode.pipeline.heatmaps import patch_runner


def small_patch_model() -> nn.Module:
    """A stand-in with the patch model's interface (grey 256 x 256 in, 4 logits out) that
    compiles in seconds; the DenseNet itself takes a minute or more on two cores."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 7, stride=4, padding=3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=4, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_runner_matches_the_model_and_pads_the_last_batch(caplog):
    model = small_patch_model()
    patches = torch.randn(5, 1, 256, 256)
    with torch.inference_mode():
        expected = torch.softmax(model(patches), dim=1)
    with caplog.at_level(logging.WARNING, logger="mammonode.pipeline.inference"):
        run = patch_runner(copy.deepcopy(model), channels_last=True, compiled_batch=4)
    assert not caplog.records, "the model should have compiled here"
    out = torch.cat([run(patches[:4]), run(patches[4:])])  # 4, then 1 padded to 4
    assert out.shape == (5, 4)
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected[0], expected[1])  # the comparison can tell patches apart


def test_no_compiler_leaves_the_model_uncompiled_with_a_warning(caplog, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/g++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    model = small_patch_model()
    patches = torch.randn(3, 1, 256, 256)
    with caplog.at_level(logging.WARNING, logger="mammonode.pipeline.inference"):
        run = patch_runner(copy.deepcopy(model), channels_last=True, compiled_batch=2)
    assert any("running it uncompiled" in r.getMessage() for r in caplog.records)
    with torch.inference_mode():
        expected = torch.softmax(model(patches), dim=1)
    assert torch.allclose(run(patches), expected, atol=1e-6, rtol=0)
