"""fcmae: FCMAE pretraining and fine-tuning of ConvNeXt V2."""
from fcmae.errors import UserError
from fcmae.models import create_model, list_models

__all__ = ["UserError", "create_model", "list_models"]
