"""The cancer classifiers as loaded for inference: each basic block's bn2 folded into the
convolution before it. Compared here with the same weights unfolded; the fidelity tests
compare the whole pipeline with the original's outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mammonode.exam.views import VIEWS
from mammonode.pipeline.models.resnet22 import BasicBlockV2, fold_batch_norms
from mammonode.pipeline.registry import spec
from mammonode.pipeline.weights import load_model, load_strict, model_file, read_state_dict


@pytest.mark.parametrize("name", ["image_only", "image_heatmaps_imagewise"])
def test_loaded_classifier_has_bn2_folded_and_the_unfolded_outputs(name, test_weights_dir):
    path = model_file(test_weights_dir, name)
    model_spec = spec(name)
    unfolded = load_strict(model_spec.build(), read_state_dict(path, model_spec), path)
    generator = torch.Generator().manual_seed(0)
    for norm in unfolded.modules():  # statistics far from identity, so that a wrong fold shows
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.copy_(torch.rand(norm.num_features, generator=generator) - 0.5)
            norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
    folded = fold_batch_norms(load_strict(model_spec.build(), unfolded.state_dict(), path))
    for model in (folded, load_model(name, test_weights_dir)):
        blocks = [m for m in model.modules() if isinstance(m, BasicBlockV2)]
        assert blocks and all(isinstance(b.bn2, nn.Identity) and b.conv1.bias is not None for b in blocks)
    torch.manual_seed(0)
    channels = 1 if "only" in name else 3
    with torch.inference_mode():
        if name == "image_only":
            x = {view: torch.randn(2, channels, 160, 128) for view in VIEWS}
            expected, got = unfolded(x), folded(x)
            pairs = [(expected[k], got[k]) for k in expected]
        else:
            x = torch.randn(2, channels, 160, 128)
            pairs = [(unfolded.single("L-CC")(x), folded.single("L-CC")(x))]
    for want, have in pairs:
        assert torch.allclose(have, want, atol=1e-5, rtol=0)
        assert (want[0] - want[1]).abs().max() > 1e-4  # inputs that differ give outputs that differ


def test_folding_wants_a_model_in_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(spec("image_only").build().train())
