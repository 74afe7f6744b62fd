"""Foreign checkpoint layouts, converted to and from fcmae's own (the official
dense layout of SPEC section 1, plus the FCMAE decoder keys).

- timm ``convnextv2_*`` state dicts: ``to_timm`` / ``from_timm``.
- the official pretraining checkpoint (``main_pretrain.py``): ``{"model": ...}``
  with an ``encoder.`` prefix and MinkowskiEngine-wrapped sparse layers.
- the official ``pt_only`` encoder and fine-tuned checkpoints: already dense.

``load_into(model, checkpoint)`` detects the layout, converts, and loads.
"""
import argparse
import re

import torch

from fcmae.errors import UserError
from fcmae.models.convnextv2 import SIZES

# timm registers its smallest sizes with 1x1 convolutions as MLP layers.
_TIMM_CONV_MLP = {"atto", "femto", "pico", "nano"}

# (our pattern, timm replacement), applied to our keys in order.
_TO_TIMM = [
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.grn\.gamma$", r"stages.\1.blocks.\2.mlp.grn.weight"),
    (r"^stages\.(\d+)\.(\d+)\.grn\.beta$", r"stages.\1.blocks.\2.mlp.grn.bias"),
    (r"^stages\.(\d+)\.(\d+)\.norm\.", r"stages.\1.blocks.\2.norm."),
    (r"^norm\.", "head.norm."),
    (r"^head\.", "head.fc."),
]
_FROM_TIMM = [
    (r"^stem\.", "downsample_layers.0."),
    (r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.weight$", r"stages.\1.\2.grn.gamma"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.bias$", r"stages.\1.\2.grn.beta"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"stages.\1.\2.norm."),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]


def _rename(key, rules):
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def infer_size(state):
    """The size name whose stem width and stage depths match a dense state dict, or None."""
    stem = state.get("downsample_layers.0.0.weight")
    if stem is None:
        return None
    depths = tuple(1 + max((int(m.group(1)) for k in state if (m := re.match(rf"stages\.{i}\.(\d+)\.", k))),
                           default=-1) for i in range(4))
    for name, (size_depths, dims) in SIZES.items():
        if dims[0] == stem.shape[0] and size_depths == depths:
            return name
    return None


def to_timm(state, size=None):
    """Our dense state dict -> timm's ``convnextv2_<size>`` layout (size inferred when None)."""
    size = size or infer_size(state)
    out = {}
    for key, value in state.items():
        new = _rename(key, _TO_TIMM)
        if ".grn." in new:
            value = value.flatten()
        elif size in _TIMM_CONV_MLP and re.search(r"\.mlp\.fc[12]\.weight$", new):
            value = value[:, :, None, None]
        out[new] = value
    return out


def from_timm(state):
    """timm's ``convnextv2_*`` state dict -> our dense layout."""
    out = {}
    for key, value in state.items():
        new = _rename(key, _FROM_TIMM)
        if new.endswith((".grn.gamma", ".grn.beta")):
            value = value.reshape(1, 1, 1, -1)
        elif re.search(r"\.pwconv[12]\.weight$", new):
            value = value.flatten(1)
        out[new] = value
    return out


def from_official_sparse(state):
    """The official ``main_pretrain.py`` model dict (MinkowskiEngine-wrapped
    encoder under ``encoder.``, dense decoder) -> our FCMAE layout."""
    out = {}
    for key, value in state.items():
        new = key.replace(".ln.", ".").replace(".linear.", ".")
        if new.endswith(".kernel"):
            new = new[: -len("kernel")] + "weight"
            if ".dwconv." in new:  # (k*k, C), kernel offsets column-major
                k = int(round(value.shape[0] ** 0.5))
                value = value.permute(1, 0).reshape(value.shape[1], 1, k, k).transpose(3, 2)
            else:  # (k*k, in, out)
                k = int(round(value.shape[0] ** 0.5))
                value = value.permute(2, 1, 0).reshape(value.shape[2], value.shape[1], k, k).transpose(3, 2)
        elif key.startswith("encoder.") and new.endswith(".bias") and value.dim() == 2:
            value = value.flatten()  # sparse biases are (1, C)
        elif new.endswith((".grn.gamma", ".grn.beta")):
            value = value.reshape(1, 1, 1, -1)
        out[new] = value.contiguous()
    return out


def detect(checkpoint):
    """Name the layout of a loaded checkpoint: 'timm', 'official-sparse' or 'dense'."""
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise UserError("this file holds no state dict; pass a ConvNeXt V2 / FCMAE checkpoint.")
    if any(k.endswith(".kernel") or ".ln." in k or ".linear." in k for k in checkpoint):
        return "official-sparse"
    if any(k.startswith("stem.") or ".blocks." in k for k in checkpoint):
        return "timm"
    return "dense"


def unwrap(checkpoint):
    """The state dict inside a training checkpoint (under ``model``, else
    ``model_ema`` or ``state_dict``), without a DDP ``module.`` prefix."""
    for key in ("model", "model_ema", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if isinstance(checkpoint, dict) and checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def to_fcmae_layout(checkpoint):
    """Any supported checkpoint (already loaded) -> a state dict in our names."""
    state = unwrap(checkpoint)
    layout = detect(state)
    if layout == "official-sparse":
        return from_official_sparse(state)
    if layout == "timm":
        return from_timm(state)
    return dict(state)


def read(path):
    """Load a checkpoint file (.pth/.pt/.bin via torch, or .safetensors) on the CPU, without running pickled code."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        # Official checkpoints carry their argparse arguments; allow that one class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist; check the path.") from None
    except Exception as error:  # unpickling errors come in many types
        raise UserError(f"cannot read {path} as a checkpoint ({type(error).__name__}); "
                        f"pass a .pth/.pt/.bin/.safetensors file written by torch.") from None


def load_into(model, checkpoint):
    """Load ``checkpoint`` (a path or a loaded dict in any supported layout) into an
    ``FCMAE`` or a ``ConvNeXtV2``. An encoder-only checkpoint fills an FCMAE's
    encoder; an FCMAE checkpoint gives a ConvNeXtV2 its encoder (the decoder is
    left out). A classifier head of another class count is left out, so it stays
    freshly initialised; any other shape must match. Returns (missing, unexpected)
    key lists."""
    name = checkpoint if not isinstance(checkpoint, dict) else "the checkpoint"
    if not isinstance(checkpoint, dict):
        checkpoint = read(checkpoint)
    state = to_fcmae_layout(checkpoint)
    has_encoder_prefix = any(k.startswith("encoder.") for k in state)
    expected = model.state_dict()
    if hasattr(model, "encoder"):  # FCMAE
        if not has_encoder_prefix:
            state = {f"encoder.{k}": v for k, v in state.items()}
    else:
        if has_encoder_prefix:
            state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if "head.weight" in state and "head.weight" in expected and state["head.weight"].shape != expected["head.weight"].shape:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if not expected.keys() & state.keys():
        raise UserError(f"{name} holds no ConvNeXt V2 or FCMAE weights; pass a checkpoint of this model.")
    _check_shapes(expected, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    return list(missing), list(unexpected)


def _check_shapes(expected, state):
    for key, value in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            ours = infer_size({k.removeprefix("encoder."): v for k, v in expected.items()})
            theirs = infer_size({k.removeprefix("encoder."): v for k, v in state.items()})
            hint = (f"the checkpoint is convnextv2_{theirs} and the model convnextv2_{ours}: "
                    f"build the model with the checkpoint's size."
                    if theirs and ours and theirs != ours else "build the model the checkpoint was trained as.")
            raise UserError(f"checkpoint tensor {key} has shape {tuple(value.shape)} but the model expects "
                            f"{tuple(expected[key].shape)}; {hint}")
