"""Layer-wise learning-rate decay for ConvNeXt V2 (SPEC section 3).

Each parameter gets a layer id; its lr is scaled by ``decay ** (L + 1 - id)``, so
the head (id L + 1) trains at the full lr and the stem the slowest.

- ``single``: L = sum(depths); block b of stage s has id sum(depths[:s]) + b + 1,
  downsample layer k (the stem is k = 0) has sum(depths[:k]) + 1.
- ``group`` (the recipe of base and larger): L = 12; the stem is 0, stage 0 and
  1 blocks are 1 and 2, stage 2 blocks go three to an id from 3, stage 3 and
  its downsample are 12, downsample layers 1 and 2 are 2 and 3.

Everything else (final norm, head) has id L + 1.
"""
from fcmae.engine import no_weight_decay

MODES = ("single", "group")
GROUP_LAYERS = 12


def num_layers(depths, mode):
    return sum(depths) if mode == "single" else GROUP_LAYERS


def layer_id(name, depths, mode):
    """The layer id of parameter ``name`` of a ConvNeXtV2 with these depths."""
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        stage = int(parts[1])
        if mode == "single":
            return sum(depths[:stage]) + 1
        return (0, 2, 3, GROUP_LAYERS)[stage]
    if parts[0] == "stages":
        stage, block = int(parts[1]), int(parts[2])
        if mode == "single":
            return sum(depths[:stage]) + block + 1
        return (1, 2, 3 + block // 3, GROUP_LAYERS)[stage]
    return num_layers(depths, mode) + 1


def param_groups(model, weight_decay, decay, mode):
    """AdamW parameter groups of a ConvNeXtV2, one per (layer id, decayed or not),
    each with its ``lr_scale``."""
    if mode not in MODES:
        raise ValueError(f"layer decay mode {mode!r}; choose one of {', '.join(MODES)}")
    top = num_layers(model.depths, mode) + 1
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, model.depths, mode)
        skip = no_weight_decay(name, param)
        group = groups.setdefault((layer, skip), {
            "params": [], "weight_decay": 0.0 if skip else weight_decay, "lr_scale": decay ** (top - layer)})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]
