"""What runs on the device uses dtypes every device has: MPS (Apple silicon) has no float64.

No MPS here: a dispatch mode records the dtype of every tensor that an aten op makes while
the engine's optimizer step and evaluation run (on the CPU, the device of CI), and float64 is
refused. The step statistics (`engine._add`) and evaluation's totals were float64 tensors on
the device, which fails on MPS at the first step.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader

from fcmae.data.sources import collate
from fcmae.finetune.evaluate import evaluate
from fcmae.train.engine import Loop
from fcmae.train.runtime import Runtime


class Float64Watch(TorchDispatchMode):
    """Records the aten ops that return a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves(out)):
            self.ops.append(str(func))
        return out


def test_the_optimizer_step_makes_no_float64_tensor(tmp_path, monkeypatch):
    import test_engine  # the engine tests' stand-in model, dataset and settings

    watch = Float64Watch()
    step = Loop.step

    def watched(self, *args, **kwargs):
        with watch:
            return step(self, *args, **kwargs)

    monkeypatch.setattr(Loop, "step", watched)
    cfg = test_engine.config(tmp_path, epochs=1, effective_batch=16, clip_grad=1.0)
    _, result = test_engine.train(cfg)
    assert result["loss"] > 0 and result["epoch"] == 1
    assert watch.ops == []


def test_evaluation_makes_no_float64_tensor_and_sums_exactly():
    from test_evaluate import LABELS, LOGITS, Indexed, Lookup

    loader = DataLoader(Indexed(LABELS * 3), batch_size=2, collate_fn=collate)
    watch = Float64Watch()
    with watch:
        result = evaluate({"a": Lookup(LOGITS.repeat(3, 1))}, loader, Runtime("cpu", "fp32", 0))
    assert watch.ops == []
    expected = torch.nn.functional.cross_entropy(
        LOGITS.repeat(3, 1).double(), torch.tensor(LABELS * 3)
    )
    assert abs(result["a"]["loss"] - expected.item()) < 1e-6
    assert result["a"]["images"] == 15 and isinstance(result["a"]["images"], int)


def test_running_out_of_memory_on_mps_is_the_same_sentence():
    from fcmae.train.failures import is_out_of_memory

    said = "MPS backend out of memory (MPS allocated: 5.50 GB, other allocations: 14.76 GB)"
    assert is_out_of_memory(RuntimeError(said))
    assert not is_out_of_memory(RuntimeError("MPS backend: unsupported op"))
