"""Checkpoint layouts: any ConvNeXt V2 / FCMAE checkpoint, read once into one record, loaded.

fcmae's own names are the official dense layout of SPEC section 1 (plus the FCMAE decoder's
keys beside an ``encoder.`` prefix). Read in:

- fcmae's training checkpoints and exports, the official ``pt_only`` encoders and fine-tuned
  checkpoints (``model`` / ``model_ema``): already dense;
- the official pretraining checkpoint (``main_pretrain.py``): MinkowskiEngine-wrapped sparse
  layers under ``encoder.``, converted by SPEC section 2's kernel formulas;
- timm's ``convnextv2_*`` state dicts: names mapped by timm's own ``checkpoint_filter_fn``;
  timm's releases on the Hugging Face Hub are read by name (``timm/convnextv2_tiny.fcmae``),
  through huggingface_hub's download and cache.

    weights = read_weights("encoder-1600.pth")      # Weights: encoder, rest, model, in_chans
    weights = read_weights("timm/convnextv2_base.fcmae_ft_in1k")  # a file wins over a Hub name
    load_into(model, weights)                       # a ConvNeXtV2, an FCMAE or a linear probe
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcmae.checkpoint import read
from fcmae.errors import UserError
from fcmae.models import SIZES, create_model

log = logging.getLogger("fcmae")

State = dict[str, torch.Tensor]


PROBE_HEAD = "head.1.weight"  # a linear probe's Linear, beside its encoder (fcmae linprobe)


@dataclass
class Weights:
    """A checkpoint in fcmae's names: ``encoder`` (the dense layout, with ``norm`` and ``head``
    when it is a classifier) and ``rest`` (what sat beside an ``encoder.`` prefix: an FCMAE
    decoder, a linear probe's head)."""

    source: str
    encoder: State
    rest: State
    model: str  # e.g. "convnextv2_atto"
    in_chans: int
    settings: dict[str, Any]  # the training run's settings, when the file carries them
    classes: list[str] | None = None  # a classifier's class folder names, when it carries them

    @property
    def num_classes(self) -> int | None:
        """Classes of the classifier head (a fine-tuned one, or a linear probe's); None for an
        encoder."""
        head = self.encoder.get("head.weight", self.rest.get(PROBE_HEAD))
        return None if head is None else head.shape[0]

    @property
    def is_probe(self) -> bool:
        """A linear probe: the encoder and, beside it, BatchNorm1d + Linear on pooled features."""
        return PROBE_HEAD in self.rest

    @property
    def has_decoder(self) -> bool:
        return "mask_token" in self.rest


def infer_size(state: State) -> str | None:
    """The size whose stem width and stage depths match a state dict (dense or timm names)."""
    stem = state.get("downsample_layers.0.0.weight", state.get("stem.0.weight"))
    if stem is None:
        return None
    blocks = [re.match(r"stages\.(\d)\.(?:blocks\.)?(\d+)\.", k) for k in state]
    depths = tuple(
        1 + max((int(m[2]) for m in blocks if m and int(m[1]) == i), default=-1) for i in range(4)
    )
    for name, (size_depths, dims) in SIZES.items():
        if dims[0] == stem.shape[0] and size_depths == depths:
            return name
    return None


@functools.cache
def _timm_model(size: str) -> nn.Module:
    """timm's convnextv2_<size> on the meta device: names and shapes, no memory."""
    import timm

    with torch.device("meta"):
        return timm.create_model(f"convnextv2_{size}", pretrained=False)


@functools.cache
def _names(size: str) -> dict[str, str]:
    """fcmae's dense key -> timm's, for a classifier of this size, by timm's own filter."""
    from timm.models.convnext import checkpoint_filter_fn

    with torch.device("meta"):
        ours = create_model(f"convnextv2_{size}").state_dict()
    return {
        key: next(iter(checkpoint_filter_fn({key: value}, _timm_model(size))))
        for key, value in ours.items()
    }


def to_timm(state: State, size: str | None = None) -> State:
    """A dense state dict -> timm's ``convnextv2_<size>`` layout (size inferred when None)."""
    from timm.models.convnext import checkpoint_filter_fn

    return checkpoint_filter_fn(state, _timm_model(size or infer_size(state)))


def from_timm(state: State) -> State:
    """timm's ``convnextv2_*`` state dict -> the dense layout."""
    size = infer_size(state)
    ours = {timm_key: key for key, timm_key in _names(size).items()}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create_model(f"convnextv2_{size}").state_dict().items()}
    out = {}
    for key, value in state.items():
        new = ours.get(key, key)
        # timm's small sizes hold the MLP as 1x1 convs (4-d where ours are 2-d); the stem keeps
        # its own in_chans and the head its own class count.
        reshape = new in shapes and value.dim() != len(shapes[new])
        out[new] = value.reshape(shapes[new]) if reshape else value
    return out


def to_me_kernel(weight: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """A square conv weight -> MinkowskiEngine's kernel: (k*k, C) for a depthwise conv weight
    (C, 1, k, k), else (k*k, in, out). Kernel offsets run column-major: offset (dy, dx) is row
    dx * k + dy."""
    k = weight.shape[-1]
    if depthwise:
        kernel = weight.transpose(3, 2).reshape(weight.shape[0], k * k).permute(1, 0)
    else:
        kernel = weight.transpose(3, 2).reshape(*weight.shape[:2], k * k).permute(2, 1, 0)
    return kernel.contiguous()


def from_me_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_me_kernel``: (k*k, C) -> (C, 1, k, k), (k*k, in, out) -> (out, in,
    k, k)."""
    k = round(kernel.shape[0] ** 0.5)
    if kernel.dim() == 2:
        return kernel.permute(1, 0).reshape(kernel.shape[1], 1, k, k).transpose(3, 2)
    return kernel.permute(2, 1, 0).reshape(kernel.shape[2], kernel.shape[1], k, k).transpose(3, 2)


def from_official_sparse(state: State) -> State:
    """The official ``main_pretrain.py`` model dict (MinkowskiEngine-wrapped encoder under
    ``encoder.``, dense decoder) -> fcmae's FCMAE layout."""
    out = {}
    for key, value in state.items():
        new = key.replace(".ln.", ".").replace(".linear.", ".")
        if new.endswith(".kernel"):
            new = new[: -len("kernel")] + "weight"
            value = from_me_kernel(value)
        elif key.startswith("encoder.") and new.endswith(".bias") and value.dim() == 2:
            value = value.flatten()  # sparse biases are (1, C)
        elif new.endswith((".grn.gamma", ".grn.beta")):
            value = value.reshape(1, 1, 1, -1)
        out[new] = value.contiguous()
    return out


def _unwrap(checkpoint: Any) -> Any:
    """The state dict inside a training checkpoint (under ``model``, else ``model_ema`` or
    ``state_dict``), without a DDP ``module.`` prefix."""
    for key in ("model", "model_ema", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if (
        isinstance(checkpoint, dict)
        and checkpoint
        and all(k.startswith("module.") for k in checkpoint)
    ):
        checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    return checkpoint


HUB_PREFIX = "hf-hub:"  # timm's spelling of a Hub name, accepted too
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm publishes, in its order
_HUB_NAME = re.compile(r"(?:hf-hub:)?([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def hub_name(source: str) -> str | None:
    """The Hugging Face Hub repository that source names ("timm/convnextv2_tiny.fcmae", or
    "hf-hub:timm/convnextv2_tiny.fcmae"), or None for a path: a file that exists wins, and so
    does a name with more than one folder or a checkpoint's suffix."""
    match = _HUB_NAME.fullmatch(source)
    if match is None or Path(source).exists():
        return None
    if not source.startswith(HUB_PREFIX) and source.endswith(_CHECKPOINT_SUFFIXES):
        return None
    return match[1]


def _check_release(repo: str) -> None:
    """Refuse, by its name alone and before any download, a repository that is not a ConvNeXt
    V2 release; under timm/ the name must be one timm lists."""
    org, name = repo.split("/")
    if not name.startswith("convnextv2_"):
        raise UserError(
            f"{repo} is neither a file nor a ConvNeXt V2 release on the Hugging Face Hub; pass "
            f"a checkpoint path or a name such as timm/convnextv2_tiny.fcmae."
        )
    if org != "timm":
        return
    import timm

    releases = timm.list_pretrained("convnextv2_*")
    if name not in releases:
        same_size = [r for r in releases if r.split(".")[0] == name.split(".")[0]]
        choices = (
            f"one of {', '.join(f'timm/{r}' for r in same_size)}"
            if same_size
            else "a name from timm.list_pretrained('convnextv2_*'), e.g. timm/convnextv2_tiny.fcmae"
        )
        raise UserError(f"{repo} is not one of timm's ConvNeXt V2 releases; pass {choices}.")


def hub_file(repo: str) -> Path:
    """The weights file of a Hub repository of timm weights (model.safetensors, else
    pytorch_model.bin), from huggingface_hub's cache or downloaded into it: HF_HOME /
    HF_HUB_CACHE say where, HF_HUB_OFFLINE=1 reads the cache alone."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    _check_release(repo)
    not_cached = False
    for filename in HUB_FILES:
        try:
            return Path(hf_hub_download(repo, filename))
        except LocalEntryNotFoundError:  # offline or unreachable, and not in the cache
            not_cached = True
        except EntryNotFoundError:  # the repository has no such file: try the next
            pass
        except RepositoryNotFoundError:
            raise UserError(
                f"{repo} does not exist on the Hugging Face Hub, or is private or gated (log in "
                f"with `hf auth login` for those); check the name."
            ) from None
        except (OSError, ValueError) as e:  # other HTTP errors, a damaged cache
            detail = str(e).splitlines()[0] if str(e) else "no detail"
            raise UserError(
                f"Cannot download {repo} from the Hugging Face Hub ({type(e).__name__}: "
                f"{detail}); check the network, or pass a checkpoint file."
            ) from None
    if not_cached:
        why = (
            "HF_HUB_OFFLINE=1 prevents the download"
            if constants.HF_HUB_OFFLINE
            else "the Hub cannot be reached"
        )
        raise UserError(
            f"{repo} is not cached in {constants.HF_HUB_CACHE} and {why}; download it once "
            f"with the network on, point HF_HOME at a cache that holds it, or pass a "
            f"checkpoint file."
        )
    raise UserError(
        f"{repo} holds neither {' nor '.join(HUB_FILES)}; pass a repository of timm weights "
        f"or a checkpoint file."
    )


def read_weights(source: str | Path | dict, flag: str = "the checkpoint") -> Weights:
    """Read a checkpoint of any supported layout: a path, a Hub name of timm weights such as
    "timm/convnextv2_tiny.fcmae" (see hub_name), or an already loaded dict; flag names where it
    came from in errors (e.g. "--pretrained")."""
    name = str(source) if not isinstance(source, dict) else flag
    if isinstance(source, dict):
        checkpoint = source
    else:
        repo = hub_name(name)
        checkpoint = read(hub_file(repo) if repo else source)
    state = _unwrap(checkpoint)
    if not isinstance(state, dict) or not state:
        raise UserError(f"{name} holds no state dict; pass a ConvNeXt V2 or FCMAE checkpoint.")
    if any(k.endswith(".kernel") or ".ln." in k or ".linear." in k for k in state):
        state = from_official_sparse(state)
    elif any(k.startswith("stem.") or ".blocks." in k for k in state):
        state = from_timm(state)
    encoder, rest = dict(state), {}
    if any(k.startswith("encoder.") for k in state):
        encoder = {
            k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")
        }
        rest = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    size = infer_size(encoder)
    if size is None:
        where = f" (from {flag})" if name != flag else ""
        raise UserError(
            f"{name}{where} holds no ConvNeXt V2 or FCMAE weights of a known size; "
            f"pass an fcmae, official or timm ConvNeXt V2 checkpoint."
        )
    in_chans = encoder["downsample_layers.0.0.weight"].shape[1]
    return Weights(
        name,
        encoder,
        rest,
        f"convnextv2_{size}",
        in_chans,
        _settings(checkpoint),
        _classes(checkpoint),
    )


def _classes(checkpoint: Any) -> list[str] | None:
    """The class names a fine-tuning checkpoint or export was trained on (fcmae writes them as
    "classes", and in a training checkpoint's extra state)."""
    if not isinstance(checkpoint, dict):
        return None
    extra = checkpoint.get("extra")
    if isinstance(extra, dict) and isinstance(extra.get("classes"), dict):
        return list(extra["classes"].get("names", [])) or None
    names = checkpoint.get("classes")
    return list(names) if isinstance(names, list) else None


def _settings(checkpoint: Any) -> dict[str, Any]:
    """The run's settings in a training checkpoint: fcmae's "config", the official "args"."""
    if not isinstance(checkpoint, dict):
        return {}
    settings = checkpoint.get("config", checkpoint.get("args"))
    if isinstance(settings, argparse.Namespace):
        settings = vars(settings)
    return dict(settings) if isinstance(settings, dict) else {}


def check_fits(weights: Weights, model: str, in_chans: int) -> None:
    """Refuse weights of another size or input channels, naming the flag that fixes it."""
    if weights.model != model:
        raise UserError(
            f"{weights.source} is a {weights.model} checkpoint but --model is "
            f"{model}; pass --model {weights.model}."
        )
    if weights.in_chans != in_chans:
        raise UserError(
            f"{weights.source} takes {weights.in_chans}-channel images but "
            f"--in-chans is {in_chans}; pass --in-chans {weights.in_chans}."
        )


def load_into(
    model: nn.Module, weights: Weights | str | Path | dict
) -> tuple[list[str], list[str]]:
    """Load weights (a Weights, a path, a Hub name or a loaded dict in any supported layout)
    into a ConvNeXtV2, or into a model that holds one as ``.encoder`` (FCMAE, a linear probe).

    An encoder fills an FCMAE's encoder; an FCMAE checkpoint gives a classifier its encoder.
    A classifier head of another class count is left out, so it stays freshly initialised;
    any other shape must match. Logs and returns the (missing, unexpected) keys.
    """
    if not isinstance(weights, Weights):
        weights = read_weights(weights)
    expected = model.state_dict()
    if hasattr(model, "encoder"):
        state = {**{f"encoder.{k}": v for k, v in weights.encoder.items()}, **weights.rest}
    else:
        state = dict(weights.encoder)
    head = state.get("head.weight")
    if (
        head is not None
        and "head.weight" in expected
        and head.shape != expected["head.weight"].shape
    ):
        log.info(
            "The checkpoint's head has %d classes and this model %d: the head starts fresh.",
            head.shape[0],
            expected["head.weight"].shape[0],
        )
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    _check_shapes(expected, state, weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    log.info("Loaded %s (%s).", weights.source, weights.model)
    if missing:
        log.info("Not in the checkpoint, initialised fresh: %s.", ", ".join(missing))
    if unexpected:
        log.info("In the checkpoint but not used: %s.", ", ".join(unexpected))
    return list(missing), list(unexpected)


def _check_shapes(expected: State, state: State, weights: Weights) -> None:
    for key, value in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            ours = infer_size({k.removeprefix("encoder."): v for k, v in expected.items()})
            hint = (
                f"the checkpoint is {weights.model} and the model convnextv2_{ours}: build "
                f"the model with the checkpoint's size."
                if ours and f"convnextv2_{ours}" != weights.model
                else "build the model the checkpoint was trained as."
            )
            raise UserError(
                f"checkpoint tensor {key} has shape {tuple(value.shape)} but the "
                f"model expects {tuple(expected[key].shape)}; {hint}"
            )
