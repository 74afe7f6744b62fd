"""Activation checkpointing (--grad-checkpointing): the same loss and the same gradient of every
parameter as without it, on every backend, with fewer activations kept for the backward pass;
and the flag reaches the models that pretrain and finetune build."""

import pytest
import torch
from helpers import assert_close_to_scale, randomize_

import fcmae
from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.finetune import finetune
from fcmae.finetune.config import FinetuneConfig
from fcmae.pretrain import job as pretrain
from fcmae.sites import backend_class


def loss_grads_and_kept_bytes(model, loss_fn):
    """The loss, every parameter's gradient, and the bytes of the tensors autograd kept for the
    backward pass outside checkpointed blocks (those keep their own and drop them)."""
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad()
    torch.manual_seed(0)  # the same drop path draws in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, sum(kept.values())


def assert_checkpointing_changes_memory_only(model, loss_fn, grad_tol=1e-6):
    loss, grads, kept = loss_grads_and_kept_bytes(model, loss_fn)
    model.set_grad_checkpointing()
    checkpointed_loss, checkpointed_grads, checkpointed_kept = loss_grads_and_kept_bytes(
        model, loss_fn
    )
    assert_close_to_scale(checkpointed_loss, loss)
    assert checkpointed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert_close_to_scale(checkpointed_grads[name], grad, tol=grad_tol, name=name)
    assert checkpointed_kept < kept / 2, (checkpointed_kept, kept)


@pytest.mark.parametrize("backend", ["sparse", "dense", "minkowski"])
def test_fcmae_pretraining_step_is_unchanged_by_checkpointing(backend):
    try:
        backend_class(backend)
    except fcmae.UserError as error:  # minkowski without MinkowskiEngine
        pytest.skip(str(error))
    model = fcmae.create_model("fcmae_convnextv2_atto", backend=backend, decoder_dim=64)
    randomize_(model, seed=1, scale=0.05)
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 1]])
    assert_checkpointing_changes_memory_only(model, lambda: model(imgs, mask)[0])


def test_classifier_with_drop_path_is_unchanged_by_checkpointing():
    model = fcmae.create_model("convnextv2_atto", num_classes=3, drop_path_rate=0.3)
    randomize_(model, seed=2, scale=0.05).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    assert_checkpointing_changes_memory_only(
        model, lambda: torch.nn.functional.cross_entropy(model(images), labels)
    )


def test_the_flag_reaches_the_pretraining_and_fine_tuning_models():
    with torch.device("meta"):
        for flag in (False, True):
            cfg = resolve(PretrainConfig, flags={"grad_checkpointing": flag})
            assert pretrain.build_model(cfg).encoder.grad_checkpointing is flag
            cfg = resolve(FinetuneConfig, flags={"grad_checkpointing": flag})
            assert finetune.build_model(cfg, num_classes=3).grad_checkpointing is flag
