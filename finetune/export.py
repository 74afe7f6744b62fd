"""``fcmae export``: any supported checkpoint -> timm's ``convnextv2_<size>`` layout.

The result loads in timm as
``timm.create_model("convnextv2_<size>", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
(``num_classes`` other than 1000, or 0, for an encoder without a classifier).
"""
import torch

from fcmae.errors import UserError
from fcmae.formats import infer_size, read, to_fcmae_layout, to_timm


def export_timm(source, destination):
    """Write ``source`` (a checkpoint path) to ``destination`` (.safetensors, or
    anything else for torch.save) in timm's layout; returns the model name."""
    state = to_fcmae_layout(read(source))
    if any(k.startswith("encoder.") for k in state):  # an FCMAE checkpoint: keep the encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    size = infer_size(state)
    if size is None:
        raise UserError(f"{source} holds no ConvNeXt V2 weights of a known size; pass an fcmae, official or "
                        f"timm ConvNeXt V2 checkpoint.")
    if "norm.weight" not in state:  # a bare encoder: timm's head norm starts fresh, as in a new model
        width = state["downsample_layers.3.1.weight"].shape[0]
        state["norm.weight"], state["norm.bias"] = torch.ones(width), torch.zeros(width)
    state = {k: v.contiguous() for k, v in to_timm(state, size).items()}
    if str(destination).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, str(destination))
    else:
        torch.save(state, destination)
    return f"convnextv2_{size}"
