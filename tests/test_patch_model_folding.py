"""The patch model as loaded for inference: transitions pool before their convolution and
no batch norm is left (folded into convolution biases or per-channel affines). These are
rearrangements of the same function; here each is compared with the arrangement it
replaces, and the fidelity tests compare the whole pipeline with the original's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mammonode.pipeline.models.densenet import (
    ChannelAffine,
    ChannelClamp,
    DenseBlock,
    SamePadMaxPool2d,
    Transition,
    fold_batch_norms,
    fold_norm_relu,
    grey_input_densenet,
)
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
    assert isinstance(folded.features.denseblock4.denselayer16.norm1, ChannelClamp)
    assert isinstance(folded.features.transition1.norm, ChannelClamp)
    assert isinstance(folded.features.norm5, ChannelAffine)
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


@pytest.mark.parametrize("size", [128, 127, 9, 8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_stem_max_pool_equals_pooling_the_zero_padded_input(size, channels_last):
    """SAME padding as the original writes it (zeros, bottom/right for an even side), pooled
    plainly, against the pool as run (ceil mode where that has the same windows)."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 8, size, size + 1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pool = SamePadMaxPool2d(kernel_size=3, stride=2)
    # TF's SAME padding written out: total k - s where the side divides by s, else k - n % s;
    # the smaller half before.
    total = [max(3 - 2, 0) if n % 2 == 0 else max(3 - n % 2, 0) for n in x.shape[2:]]
    top_bottom, left_right = [(t // 2, t - t // 2) for t in total]
    padded = torch.nn.functional.pad(x, (*left_right, *top_bottom))
    expected = torch.nn.functional.max_pool2d(padded, 3, 2)
    got = pool(x)
    assert got.shape == expected.shape == (2, 8, -(-size // 2), -(-(size + 1) // 2))
    assert torch.equal(got, expected)


def test_dense_block_buffer_keeps_the_input_layout():
    block = DenseBlock(2, 16, 8, 2).eval()
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = block(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[:, :16], x)


def test_norm_relu_moves_into_the_following_1x1_convolution_whatever_the_scale_sign():
    """Channels with a positive, a negative and a zero scale (gamma), inputs on both sides
    of each channel's threshold: conv(relu(norm(x))) as the original runs it, against the
    clamp and the convolution that take its place."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.5, -0.7, 0.0, 0.3, -2.0, 0.0]))
        norm.bias.copy_(torch.tensor([0.2, 0.1, 0.4, -0.3, -0.5, -0.6]))
        norm.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5, 0.2]))
        norm.running_var.copy_(torch.tensor([0.5, 1.2, 0.9, 2.0, 0.3, 1.0]))
    conv = nn.Conv2d(6, 5, kernel_size=1, bias=True)
    x = torch.randn(3, 6, 7, 9) * 2
    with torch.inference_mode():
        expected = conv(torch.relu(norm(x)))
        clamp, folded = fold_norm_relu(norm, conv)
        got = folded(clamp(x))
        got_channels_last = folded.to(memory_format=torch.channels_last)(
            clamp(x.contiguous(memory_format=torch.channels_last))
        )
    assert not clamp.lower_only  # the negative scales give upper bounds
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert torch.allclose(got_channels_last, expected, atol=1e-5, rtol=0)
    assert (torch.relu(norm(x)) == 0).any() and (torch.relu(norm(x)) > 0).any()


def test_norm_relu_fold_refuses_a_convolution_that_is_not_1x1():
    with pytest.raises(ValueError, match="1x1"):
        fold_norm_relu(nn.BatchNorm2d(4).eval(), nn.Conv2d(4, 4, kernel_size=3, padding=1))


def test_a_folded_transition_refuses_an_odd_side(test_weights_dir):
    model = load_model("patch", test_weights_dir)
    with torch.inference_mode(), pytest.raises(ValueError, match="even sides"):
        model.features.transition1(torch.zeros(1, 256, 15, 16))


def test_whole_patch_model_folds_with_negative_and_zero_scales(test_weights_dir):
    """The test weights' convolutions with other statistics (some scales negative, one
    channel's zero), so every branch of the fold runs in the whole network."""
    path = model_file(test_weights_dir, "patch")
    model_spec = spec("patch")
    unfolded = grey_input_densenet(load_strict(model_spec.build(), read_state_dict(path, model_spec), path))
    randomise_statistics(unfolded, seed=3)
    torch.manual_seed(0)
    with torch.no_grad():
        unfolded.features.denseblock2.denselayer5.norm1.weight[7] = 0.0
    folded = fold_batch_norms(copy.deepcopy(unfolded))
    patches = torch.randn(2, 1, 256, 256)
    with torch.inference_mode():
        expected = unfolded(patches)  # logits: the softmax of these weights is nearly flat
        got = folded(patches)
    spread = (expected[0] - expected[1]).abs().max()
    assert spread > 1e-3
    assert (got - expected).abs().max() < 1e-3 * spread


def test_front_layers_in_smaller_batches_give_each_patch_the_same_logits(test_weights_dir):
    model = load_model("patch", test_weights_dir)
    torch.manual_seed(0)
    patches = torch.randn(5, 1, 256, 256)
    with torch.inference_mode():
        whole = model(patches)
        split = model(patches, front_batch=2)  # parts of 2, 2 and 1 before the deep layers
        one_by_one = torch.cat([model(p[None]) for p in patches])
    assert torch.allclose(split, whole, atol=1e-5, rtol=0)
    assert torch.allclose(one_by_one, whole, atol=1e-5, rtol=0)
    assert (whole.max(dim=0).values - whole.min(dim=0).values).max() > 1e-4
