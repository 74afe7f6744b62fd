"""The pretraining recipe's numbers: the paper's recipe for every size, and the short demo run
on the embedded photos (without --data), layered by fcmae.config.commands.PretrainConfig.recipe.
Torch-free."""

from __future__ import annotations

from typing import Any

# The paper's pretraining recipe (its appendix; the official TRAINING.md gives the same command
# for convnextv2_base), the same for every size. 1600 epochs is what the released encoders were
# trained for; the paper's ablations use 800.
PRETRAIN_RECIPE: dict[str, Any] = {
    "epochs": 1600,
    "warmup_epochs": 40,
    "batch_size": 64,
    "effective_batch": 4096,
    "blr": 1.5e-4,
    "min_lr": 0,
    "weight_decay": 0.05,
    "betas": (0.9, 0.95),
    "input_size": 224,
    "patch_size": 32,
    "mask_ratio": 0.6,
    "norm_pix_loss": True,
    "decay_grn": True,  # the official main_pretrain.py decays all but 1-D tensors and biases
}

# Without --data: a short run on the embedded photos that finishes in a few minutes on a
# 2-core CPU and still shows the loss falling. Small batches need a higher lr than the rule gives.
PRETRAIN_DEMO: dict[str, Any] = {
    "epochs": 30,
    "warmup_epochs": 2,
    "batch_size": 32,
    "effective_batch": None,
    "blr": 1.5e-2,
    "input_size": 96,
}
