"""Checkpoint layouts: any ConvNeXt V2 / FCMAE checkpoint, read once into one record, loaded,
and the one "build the model this file holds".

fcmae's own names are the official dense layout (facebookresearch/ConvNeXt-V2,
``models/convnextv2.py``), plus the FCMAE decoder's keys beside an ``encoder.`` prefix
(``models/fcmae.py``). Every other layout is one entry of LAYOUTS, a (detect, convert) pair
that read_weights walks in order:

- the official pretraining checkpoint (``main_pretrain.py``): MinkowskiEngine-wrapped sparse
  layers under ``encoder.``, converted as the official ``remap_checkpoint_keys`` does;
- timm's ``convnextv2_*`` state dicts: names mapped by timm's own ``checkpoint_filter_fn``
  (fcmae.weights.timm_names); timm's releases on the Hugging Face Hub are read by name
  (``timm/convnextv2_tiny.fcmae``, see fcmae.weights.hub);
- dense: fcmae's training checkpoints and exports, the official ``pt_only`` encoders and
  fine-tuned checkpoints (``model`` / ``model_ema``), already in our names.

    weights = read_weights("encoder-1600.pth")      # Weights: network, rest, model, in_chans
    weights = read_weights("timm/convnextv2_base.fcmae_ft_in1k")  # a file wins over a Hub name
    load_into(model, weights)                       # a ConvNeXtV2, an FCMAE, a model around one
                                                    # (of any in_chans: fcmae.weights.channels)
    model = build_model(weights, "fcmae")           # the FCMAE it was trained as, loaded
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcmae.errors import UserError
from fcmae.models import create_model
from fcmae.run.checkpoint import read
from fcmae.sites.kernels import from_me_kernel
from fcmae.weights.channels import STEM, adapt_states
from fcmae.weights.hub import hub_file, hub_name
from fcmae.weights.timm_names import from_timm, infer_size

log = logging.getLogger("fcmae")

State = dict[str, torch.Tensor]


@dataclass
class Weights:
    """A checkpoint in fcmae's names: ``network`` (the dense ConvNeXtV2: stem and stages, with
    ``norm`` and ``head`` when it is a classifier) and ``rest`` (what sat beside an
    ``encoder.`` prefix: an FCMAE decoder, the head of a model built around the network)."""

    source: str
    network: State
    rest: State
    model: str  # e.g. "convnextv2_atto"
    in_chans: int
    layout: str  # the LAYOUTS entry it was read as
    settings: dict[str, Any]  # the training run's settings, when the file carries them
    # The file's other entries, tensors left out: plain data for the stage that wrote them
    # (a training checkpoint's "extra" state, an export's "classes", its "epoch").
    metadata: dict[str, Any]

    @property
    def num_classes(self) -> int | None:
        """Classes of the network's own classifier head; None for an encoder."""
        head = self.network.get("head.weight")
        return None if head is None else head.shape[0]

    @property
    def pixel_stats(self) -> str | None:
        """The statistics its images were normalised with, as the run recorded them
        (fcmae.data.stats): an export's own, else its run's settings; None when unrecorded."""
        stats = self.metadata.get("pixel_stats", self.settings.get("pixel_stats"))
        return stats if isinstance(stats, str) else None

    @property
    def has_decoder(self) -> bool:
        return "mask_token" in self.rest

    @property
    def decoder_shape(self) -> tuple[int, int] | None:
        """The FCMAE decoder's (depth, width) the file holds; None without a decoder."""
        if not self.has_decoder:
            return None
        blocks = {key.split(".")[1] for key in self.rest if key.startswith("decoder.")}
        return len(blocks), self.rest["mask_token"].shape[1]

    @property
    def grn(self) -> bool:
        """Whether the network's blocks hold GRN (ConvNeXt V2), or layer scale instead (the
        blocks of ``grn=False``)."""
        return has_grn(self.network)


def has_grn(state: State) -> bool:
    """Whether a state dict (any prefix) holds GRN parameters."""
    return any(".grn." in key for key in state)


def _grn_flag(grn: bool) -> str:
    return "--grn" if grn else "--no-grn"


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


def _is_official_sparse(state: State) -> bool:
    return any(k.endswith(".kernel") or ".ln." in k or ".linear." in k for k in state)


def _is_timm(state: State) -> bool:
    return any(k.startswith("stem.") or ".blocks." in k for k in state)


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: detect(state) tells a state dict in it, convert(state) renames it to
    fcmae's names."""

    name: str
    detect: Callable[[State], bool]
    convert: Callable[[State], State]


# Walked in order, the first whose detect says yes converts: dense, which takes anything, last.
LAYOUTS: tuple[Layout, ...] = (
    Layout("official sparse pretraining", _is_official_sparse, from_official_sparse),
    Layout("timm", _is_timm, from_timm),
    Layout("dense", lambda state: True, dict),
)

_WRAPPERS = ("model", "model_ema", "state_dict")  # where training checkpoints keep the weights


def _unwrap(checkpoint: Any) -> tuple[Any, str | None]:
    """The state dict inside a training checkpoint (under ``model``, else ``model_ema`` or
    ``state_dict``), without a DDP ``module.`` prefix, and the key it was under."""
    key = None
    for wrapper in _WRAPPERS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            key, checkpoint = wrapper, checkpoint[wrapper]
            break
    if (
        isinstance(checkpoint, dict)
        and checkpoint
        and all(k.startswith("module.") for k in checkpoint)
    ):
        checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    return checkpoint, key


def read_weights(source: str | Path | dict, flag: str = "the checkpoint") -> Weights:
    """Read a checkpoint of any layout in LAYOUTS: a path, a Hub name of timm weights such as
    "timm/convnextv2_tiny.fcmae" (see fcmae.weights.hub.hub_name), or an already loaded dict;
    flag names where it came from in errors (e.g. "--pretrained")."""
    name = str(source) if not isinstance(source, dict) else flag
    where = f" (from {flag})" if name != flag else ""
    if isinstance(source, dict):
        checkpoint = source
    else:
        repo = hub_name(name)
        checkpoint = read(hub_file(repo) if repo else source)
    state, key = _unwrap(checkpoint)
    if not isinstance(state, dict) or not state:
        raise UserError(
            f"{name}{where} holds no state dict; pass a ConvNeXt V2 or FCMAE checkpoint."
        )
    layout = next(layout for layout in LAYOUTS if layout.detect(state))
    state = layout.convert(state)
    network, rest = dict(state), {}
    if any(k.startswith("encoder.") for k in state):
        network = {
            k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")
        }
        rest = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    size = infer_size(network)
    if size is None:
        raise UserError(
            f"{name}{where} holds no ConvNeXt V2 or FCMAE weights of a known size; "
            f"pass an fcmae, official or timm ConvNeXt V2 checkpoint."
        )
    in_chans = network[STEM].shape[1]
    metadata = {k: v for k, v in checkpoint.items() if k != key} if key else {}
    return Weights(
        name,
        network,
        rest,
        f"convnextv2_{size}",
        in_chans,
        layout.name,
        _settings(checkpoint),
        _plain(metadata),
    )


def _plain(value: Any) -> Any:
    """value with its tensors left out: dicts and lists walked, other values kept as they are."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, torch.Tensor)}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value if not isinstance(v, torch.Tensor)]
        return items if isinstance(value, list) else tuple(items)
    return value


def _settings(checkpoint: Any) -> dict[str, Any]:
    """The run's settings in a training checkpoint: fcmae's "config", the official "args"."""
    if not isinstance(checkpoint, dict):
        return {}
    settings = checkpoint.get("config", checkpoint.get("args"))
    if isinstance(settings, argparse.Namespace):
        settings = vars(settings)
    return dict(settings) if isinstance(settings, dict) else {}


def check_fits(
    weights: Weights, model: str, in_chans: int, grn: bool, *, adapt: bool = False
) -> None:
    """Refuse weights of another size, input channels or block kind (with or without GRN),
    naming the flag that fixes it. adapt=True lets another channel count pass, for a network
    that is trained from the weights (load_into adapts its stem: fcmae.weights.channels); not
    for one used as it is (evaluation, kNN)."""
    if weights.model != model:
        raise UserError(
            f"{weights.source} is a {weights.model} checkpoint but --model is "
            f"{model}; pass --model {weights.model}."
        )
    if weights.in_chans != in_chans and not adapt:
        raise UserError(
            f"{weights.source} takes {weights.in_chans}-channel images but "
            f"--in-chans is {in_chans}; pass --in-chans {weights.in_chans}."
        )
    _check_grn(weights, grn)


def _check_grn(weights: Weights, grn: bool) -> None:
    if weights.grn != grn:
        held = "with GRN" if weights.grn else "without GRN (layer scale instead)"
        raise UserError(
            f"{weights.source} holds blocks {held} but the model is built "
            f"{'with' if grn else 'without'} GRN ({_grn_flag(grn)}); pass "
            f"{_grn_flag(weights.grn)}."
        )


def adapt_weights(weights: Weights, in_chans: int) -> Weights:
    """weights for a network of in_chans input channels (fcmae.weights.channels's rule): a new
    Weights with the stem adapted and an FCMAE decoder's ``pred`` left out; weights itself
    when the channels already agree."""
    if in_chans == weights.in_chans:
        return weights
    network, rest = adapt_states(weights.network, weights.rest, in_chans, weights.source)
    return dataclasses.replace(weights, network=network, rest=rest, in_chans=in_chans)


def load_into(
    model: nn.Module, weights: Weights | str | Path | dict
) -> tuple[list[str], list[str]]:
    """Load weights (a Weights, a path, a Hub name or a loaded dict in any supported layout)
    into a ConvNeXtV2, or into a model that holds one as ``.encoder`` (FCMAE, a linear probe).

    An encoder fills an FCMAE's encoder; an FCMAE checkpoint gives a classifier its encoder.
    A classifier head of another class count is left out, so it stays freshly initialised; a
    file of other input channels has its stem adapted (adapt_weights,
    an FCMAE's ``pred`` left fresh); any other shape must match. Logs and returns the
    (missing, unexpected) keys.
    """
    if not isinstance(weights, Weights):
        weights = read_weights(weights)
    expected = model.state_dict()
    stem = expected.get(STEM, expected.get(f"encoder.{STEM}"))
    if stem is not None and stem.shape[1] != weights.in_chans:
        weights = adapt_weights(weights, stem.shape[1])
    if hasattr(model, "encoder"):
        state = {**{f"encoder.{k}": v for k, v in weights.network.items()}, **weights.rest}
    else:
        state = dict(weights.network)
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
    _check_grn(weights, has_grn(expected))
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


MODEL_KINDS = ("classifier", "encoder", "fcmae")
# An FCMAE's settings as a pretraining run records them (fcmae's "config", the official
# "args": the same names); a file without one gets the FCMAE constructor's default.
FCMAE_SETTINGS = ("patch_size", "mask_ratio", "norm_pix_loss", "backend")


def build_model(
    weights: Weights,
    kind: str = "classifier",
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    **overrides: Any,
) -> nn.Module:
    """The model a file holds, built as it was trained and loaded with its weights.

    kind "classifier": the ConvNeXtV2 with the file's head (its class count); "encoder": the
    bare ConvNeXtV2 (head=False), from any file; "fcmae": the FCMAE of a pretraining checkpoint,
    its decoder's depth and width read from the weights, patch size, mask ratio,
    norm_pix_loss and backend from the run's settings. overrides go to the constructor; None
    keeps the file's value. wrap(model), when given, is what gets loaded and returned: a model
    around the built one as ``.encoder``, such as a linear probe.
    """
    kwargs: dict[str, Any] = {"in_chans": weights.in_chans, "grn": weights.grn}
    if kind == "encoder":
        name, kwargs["head"] = weights.model, False
    elif kind == "classifier":
        if weights.num_classes is None:
            raise UserError(
                f"{weights.source} has no classifier head; pass a fine-tuned checkpoint."
            )
        name, kwargs["num_classes"] = weights.model, weights.num_classes
    elif kind == "fcmae":
        if not weights.has_decoder:
            raise UserError(
                f"{weights.source} holds no decoder; pass a pretraining checkpoint, not an "
                f"encoder export."
            )
        name = f"fcmae_{weights.model}"
        kwargs["decoder_depth"], kwargs["decoder_dim"] = weights.decoder_shape
        settings = weights.settings
        kwargs.update({k: settings[k] for k in FCMAE_SETTINGS if settings.get(k) is not None})
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(MODEL_KINDS)}")
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    model = create_model(name, **kwargs)
    if wrap is not None:
        model = wrap(model)
    load_into(model, weights)
    return model
