"""NYU's image-wise cancer classifier: one view in, its breast's benign and malignant out.

The weights come in the layout of the original ``ImageBreastModel``: the view-split model's
two shared ResNet-22 columns, but one head per view (``fc1_lcc`` ... ``output_layer_rmlo``)
over that view alone, each with 4x2 outputs. The original's single-image pipeline builds
a ``SingleImageBreastModel`` for one view from such a file: the view angle's column, the
view's ``fc1``, and the first 4 rows of the view's output layer, read as 2 labels (benign,
malignant) x 2 classes. :class:`ImageBreastModel` holds the file (so it loads strictly and
the weights tooling can check it); :meth:`ImageBreastModel.single` makes the one-view model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mammonode.exam.views import VIEWS
from mammonode.pipeline.models.resnet22 import FourViewResNet, OutputLayer, ViewResNetV2

LABELS = ("benign", "malignant")
FEATURES = 256  # channels of ResNet-22's last stage


def _key(view: str) -> str:
    """The original's per-view suffix: "L-CC" -> "lcc"."""
    return view.lower().replace("-", "")


class SingleImageBreastModel(nn.Module):
    """One view: ``forward`` takes (N, C, H, W) and returns (N, 2), the probability of the
    positive class for benign and for malignant."""

    def __init__(self, input_channels: int):
        super().__init__()
        self.view_resnet = ViewResNetV2(input_channels)
        self.fc1 = nn.Linear(FEATURES, FEATURES)
        self.output_layer = OutputLayer(FEATURES, (len(LABELS), 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.view_resnet(x).flatten(2).mean(-1)
        h = F.relu(self.fc1(h))
        return self.output_layer(h)[:, :, 1].exp()


class ImageBreastModel(nn.Module):
    """The image-wise weight file's module tree (``{"model": state_dict}`` of the original),
    including the alias entries of the shared columns, so the file loads strictly."""

    def __init__(self, input_channels: int):
        super().__init__()
        self.input_channels = input_channels
        self.four_view_resnet = FourViewResNet(input_channels)
        for view in VIEWS:
            setattr(self, f"fc1_{_key(view)}", nn.Linear(FEATURES, FEATURES))
        for view in VIEWS:
            setattr(self, f"output_layer_{_key(view)}", OutputLayer(FEATURES, (4, 2)))

    def single(self, view: str) -> SingleImageBreastModel:
        """The one-view model of ``view``, as the original's ``load_state_from_shared_weights``
        builds it: the column and ``fc1`` shared with this model, the output layer's first 4
        rows copied (the other 4 are unused)."""
        model = SingleImageBreastModel(self.input_channels)
        model.view_resnet = self.four_view_resnet.column(view)
        model.fc1 = getattr(self, f"fc1_{_key(view)}")
        full = getattr(self, f"output_layer_{_key(view)}").fc_layer
        model.output_layer.to(full.weight.device)
        rows = model.output_layer.fc_layer.out_features
        with torch.no_grad():
            model.output_layer.fc_layer.weight.copy_(full.weight[:rows])
            model.output_layer.fc_layer.bias.copy_(full.bias[:rows])
        return model.train(self.training)
