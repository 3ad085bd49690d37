"""The patch model as loaded for inference: transitions pool before their convolution and
no batch norm is left (folded into convolution biases or per-channel affines). These are
rearrangements of the same function; here each is compared with the arrangement it
replaces, and the fidelity tests compare the whole pipeline with the original's outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mammonode.pipeline.models.densenet import ChannelAffine, Transition, fold_batch_norms, grey_input_densenet
from mammonode.pipeline.registry import spec
from mammonode.pipeline.weights import load_model, load_strict, model_file, read_state_dict


def randomise_statistics(module: nn.Module, seed: int = 0) -> None:
    """Batch-norm statistics far from identity, so that a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            size = norm.num_features
            norm.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            norm.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
            norm.weight.data.copy_(torch.rand(size, generator=generator) * 2 - 0.5)  # some negative
            norm.bias.data.copy_(torch.rand(size, generator=generator) * 0.4 - 0.2)


@pytest.mark.parametrize("size", [16, 15])
def test_transition_pools_before_its_convolution_with_the_same_result(size):
    torch.manual_seed(0)
    transition = Transition(64, 32).eval()
    randomise_statistics(transition)
    x = torch.randn(2, 64, size, size)
    with torch.inference_mode():
        convolved_first = transition.pool(transition.conv(transition.relu(transition.norm(x.clone()))))
        pooled_first = transition(x)
    assert pooled_first.shape == convolved_first.shape
    assert torch.allclose(pooled_first, convolved_first, atol=1e-5, rtol=0)
    assert convolved_first.abs().max() > 0.1


def test_loaded_patch_model_has_no_batch_norm_and_the_unfolded_softmax(test_weights_dir):
    path = model_file(test_weights_dir, "patch")
    model_spec = spec("patch")
    unfolded = grey_input_densenet(load_strict(model_spec.build(), read_state_dict(path, model_spec), path))
    folded = load_model("patch", test_weights_dir)
    assert not [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert folded.features.denseblock1.denselayer1.conv1.bias is not None  # norm2 went into it
    assert isinstance(folded.features.denseblock4.denselayer16.norm1, ChannelAffine)
    torch.manual_seed(0)
    patches = torch.randn(4, 1, 256, 256)
    with torch.inference_mode():
        expected = torch.softmax(unfolded(patches), dim=1)
        got = torch.softmax(folded(patches), dim=1)
        got_channels_last = torch.softmax(
            folded.to(memory_format=torch.channels_last)(patches.contiguous(memory_format=torch.channels_last)), dim=1
        )
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert torch.allclose(got_channels_last, expected, atol=1e-5, rtol=0)
    assert (expected.max(dim=0).values - expected.min(dim=0).values).max() > 1e-3  # patches differ


def test_folding_wants_a_model_in_eval_mode():
    model = grey_input_densenet(spec("patch").build()).train()
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(model)
