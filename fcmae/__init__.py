"""fcmae: FCMAE pretraining and fine-tuning of ConvNeXt V2."""

from fcmae.errors import UserError

__all__ = ["UserError", "create_model", "list_models"]


def __getattr__(name):
    # Lazy, so that `fcmae --help` answers without importing torch.
    if name in ("create_model", "list_models"):
        from fcmae import models

        return getattr(models, name)
    raise AttributeError(f"module 'fcmae' has no attribute {name!r}")
