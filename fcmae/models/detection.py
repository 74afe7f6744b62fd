"""Detection backbones for torchvision: fcmae's ConvNeXt V2 stage maps under torchvision's
FeaturePyramidNetwork, the shape torchvision's FasterRCNN, MaskRCNN and RetinaNet take.

    from torchvision.models.detection import FasterRCNN
    backbone = detection_backbone("convnextv2_tiny", pretrained="encoder-1600.pth")
    model = FasterRCNN(backbone, num_classes=91)
"""

from collections import OrderedDict

from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fcmae.models import create_model
from fcmae.weights.layouts import load_into


class FeaturePyramidBackbone(nn.Module):
    """(N, C, H, W) -> OrderedDict of ``out_channels``-channel maps: "0", "1", ... from the
    stages of ``body`` (a ConvNeXtV2Features), finest first, and "pool", a max-pooled level
    below the coarsest; the keys and levels of torchvision's own ResNet-FPN backbones."""

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    def forward(self, x):
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def detection_backbone(
    name, pretrained=None, out_indices=(0, 1, 2, 3), out_channels=256, **kwargs
) -> FeaturePyramidBackbone:
    """The FPN backbone of ``name`` (e.g. "convnextv2_tiny"), its encoder loaded from
    ``pretrained`` (any checkpoint ``fcmae.weights.layouts.load_into`` reads: fcmae's encoder
    exports, the official and timm weights) when given; kwargs (in_chans, drop_path_rate) go to the
    encoder."""
    body = create_model(name, features_only=True, out_indices=out_indices, **kwargs)
    if pretrained is not None:
        load_into(body, pretrained)
    return FeaturePyramidBackbone(body, out_channels)
