"""Model registry: ``create_model(name, **kwargs)``."""
from fcmae.errors import UserError
from fcmae.models.convnextv2 import SIZES, ConvNeXtV2
from fcmae.models.fcmae import FCMAE

_BUILDERS = {}
for _size, (_depths, _dims) in SIZES.items():
    _BUILDERS[f"convnextv2_{_size}"] = (ConvNeXtV2, _depths, _dims)
    _BUILDERS[f"fcmae_convnextv2_{_size}"] = (FCMAE, _depths, _dims)


def list_models():
    return sorted(_BUILDERS)


def create_model(name, **kwargs):
    """``convnextv2_<size>`` (classifier) or ``fcmae_convnextv2_<size>`` (FCMAE),
    size one of atto femto pico nano tiny base large huge."""
    if name not in _BUILDERS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}.")
    cls, depths, dims = _BUILDERS[name]
    return cls(depths=depths, dims=dims, **kwargs)
