"""fcmae's encoder as a real client uses it: the backbone of torchvision's Faster R-CNN under a
feature pyramid, loaded from an fcmae encoder export; one training step and one inference step
on synthetic images, nothing downloaded."""

import torch
from helpers import encoder
from torchvision.models.detection import FasterRCNN

from fcmae.models.detection import detection_backbone


def test_faster_rcnn_trains_and_detects_with_a_pretrained_fcmae_backbone(tmp_path):
    pretrained = encoder(seed=4)
    torch.save({"model": pretrained.state_dict()}, tmp_path / "encoder.pth")  # `fcmae pretrain`'s
    backbone = detection_backbone("convnextv2_atto", pretrained=tmp_path / "encoder.pth")
    assert backbone.out_channels == 256
    for name, value in pretrained.state_dict().items():
        assert torch.equal(backbone.body.state_dict()[name], value), name
    model = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128)

    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0], [60.0, 64.0, 120.0, 110.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    stem = backbone.body.downsample_layers[0][0].weight
    before = stem.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in backbone.body.parameters())
    assert stem.grad.abs().max() > 0
    optimizer.step()
    assert not torch.equal(stem, before)

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for found in detections:
        assert set(found) == {"boxes", "labels", "scores"}
        assert found["boxes"].shape == (len(found["scores"]), 4)
        assert len(found["labels"]) == len(found["scores"])
