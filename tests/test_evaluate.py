"""Top-1 / top-5 counting, several models on one pass, and exact counts over DDP shards."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fcmae.data.sources import collate
from fcmae.finetune.evaluate import evaluate
from fcmae.train.distributed import DistInfo
from fcmae.train.runtime import Runtime


class Indexed(Dataset):
    """Sample i: image = i (as a 1-pixel tensor), label = labels[i]; the files of the indices
    in unreadable stand for unreadable ones."""

    def __init__(self, labels, unreadable=()):
        self.labels, self.unreadable = labels, unreadable

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.full((1, 1, 1), float(i)), self.labels[i], i in self.unreadable


class Lookup(nn.Module):
    """Returns fixed logits per sample index."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits[images.flatten().long()]


# Six classes; the true class ranks 1st, 2nd, 6th, 1st, 5th for samples 0..4.
LABELS = [0, 1, 2, 3, 4]
LOGITS = torch.tensor(
    [
        [9.0, 1, 2, 3, 4, 5],
        [1.0, 8, 9, 3, 4, 5],
        [9.0, 8, 0, 6, 5, 4],
        [0.0, 0, 0, 7, 0, 0],
        [9.0, 8, 7, 6, 5, 4],
    ]
)


CPU = Runtime("cpu", "fp32", 0)


def test_top1_top5_and_loss_of_each_model_on_one_pass():
    loader = DataLoader(Indexed(LABELS), batch_size=2, collate_fn=collate)
    results = evaluate({"a": Lookup(LOGITS), "b": Lookup(-LOGITS)}, loader, CPU)
    a = results["a"]
    assert a["images"] == 5
    assert a["acc1"] == pytest.approx(40.0) and a["acc5"] == pytest.approx(80.0)
    expected = nn.functional.cross_entropy(LOGITS, torch.tensor(LABELS)).item()
    assert a["loss"] == pytest.approx(expected)
    assert results["b"]["acc1"] == pytest.approx(20.0)  # sample 2's true class is now the top


def test_unreadable_images_are_left_out_and_counted():
    loader = DataLoader(Indexed(LABELS, unreadable={1}), batch_size=2, collate_fn=collate)
    result = evaluate({"a": Lookup(LOGITS)}, loader, CPU)["a"]
    assert (result["images"], result["skipped"]) == (4, 1)
    assert result["acc1"] == pytest.approx(50.0) and result["acc5"] == pytest.approx(75.0)


def test_ddp_shards_count_every_image_once():
    """A DistributedSampler pads 5 images to 2 x 3 by repeating image 0; the repeat must not
    count. The two ranks are run one after the other and their sums added."""
    dataset = Indexed(LABELS)
    totals = {"acc1": 0.0, "acc5": 0.0, "images": 0}
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate)
        runtime = Runtime("cpu", "fp32", 0)
        runtime.dist = DistInfo(rank, world_size=2)  # as rank `rank` of two processes sees it
        r = evaluate({"m": Lookup(LOGITS)}, loader, runtime)["m"]
        totals["images"] += r["images"]
        totals["acc1"] += r["acc1"] * r["images"] / 5
        totals["acc5"] += r["acc5"] * r["images"] / 5
    assert totals["images"] == 5
    assert totals["acc1"] == pytest.approx(40.0) and totals["acc5"] == pytest.approx(80.0)
