"""ConvNeXt V2 (Woo et al., 2023): the one network of fcmae.

Parameter names and shapes follow the official dense layout, so official
checkpoints load with ``load_state_dict`` as they are. Features run channels
last between layers; how they are laid out over sites (full grid, or the
visible sites of a mask) is the business of a sites object from
``fcmae.sites``, which is how FCMAE runs this same network sparsely.

Dense tasks take the stage maps the way timm's models give them: ``forward_intermediates``,
and ``create_model(name, features_only=True)`` for a ``ConvNeXtV2Features``.
"""

import itertools

import torch
from timm.layers import DropPath
from timm.models import FeatureInfo
from torch import nn
from torch.utils.checkpoint import checkpoint

from fcmae.models.errors import ModelError
from fcmae.models.grn import GRN
from fcmae.models.masking import STRIDE
from fcmae.sites import stage_sites

NUM_STAGES = 4


def feature_indices(indices=None, num_stages=NUM_STAGES):
    """Stages to take, in timm's meaning of ``indices``: None, every stage; an int n, the last n;
    a sequence, those stages (0 = the first, reduction 4). Returns them sorted, without
    repeats."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ModelError(
                f"indices={indices} asks for the last {indices} of {num_stages} stages; pass a "
                f"number from 1 to {num_stages}, or a list of stage indices."
            )
        return list(range(num_stages - indices, num_stages))
    if not indices or not all(0 <= i < num_stages for i in indices):
        raise ModelError(
            f"feature indices {list(indices)} must name stages of this network; pass one or "
            f"more indices from 0 to {num_stages - 1} (stage i has reduction 4 * 2^i)."
        )
    return sorted(set(indices))


LAYER_SCALE_INIT = 1e-6  # ConvNeXt V1's layer scale, for blocks built without GRN


class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear(4d) -> GELU -> GRN -> Linear(d) -> drop path + x.

    ``grn=False`` builds ConvNeXt V1's block instead, as the paper's ablation of GRN does: no
    GRN, and a layer scale ``gamma`` (d,), initialised to 1e-6, on the block's output.
    """

    def __init__(self, dim, drop_path=0.0, grn=True):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        if grn:
            self.grn = GRN(4 * dim)
        else:
            self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, sites):
        """x: (..., C) features laid out as ``sites`` says."""
        y = self.act(self.pwconv1(self.norm(sites.dwconv(self.dwconv, x))))
        if hasattr(self, "grn"):
            y = self.grn(y, sites, self.pwconv2)
        else:
            y = self.gamma * self.pwconv2(y)
        return x + self.drop_path(y)


class Stem(nn.Sequential):
    """Conv 4x4 stride 4 on the whole image, then LayerNorm (keys .0 and .1)."""

    def __init__(self, in_chans, dim):
        super().__init__(
            nn.Conv2d(in_chans, dim, kernel_size=4, stride=4), nn.LayerNorm(dim, eps=1e-6)
        )

    def forward(self, img, sites):
        return self[1](sites.enter(self[0](img)))


class Downsample(nn.Sequential):
    """LayerNorm, then conv 2x2 stride 2 into the next stage (keys .0 and .1)."""

    def __init__(self, in_dim, out_dim):
        super().__init__(
            nn.LayerNorm(in_dim, eps=1e-6), nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)
        )

    def forward(self, x, sites, next_sites):
        return sites.downsample(self[1], self[0](x), next_sites)


class ConvNeXtV2(nn.Module):
    """ConvNeXt V2 classifier or, with ``head=False``, the bare encoder (no final
    norm, no classifier: the layout FCMAE pretrains and releases). ``grn=False`` builds the
    blocks without GRN, with ConvNeXt V1's layer scale (the paper's ablation).

    ``num_classes=0`` keeps the final norm and returns pooled features. ``feature_info`` lists
    each stage's channels (``num_chs``), ``reduction`` and ``module``, as timm's models do.
    """

    def __init__(
        self,
        in_chans=3,
        num_classes=1000,
        depths=(3, 3, 9, 3),
        dims=(96, 192, 384, 768),
        drop_path_rate=0.0,
        head_init_scale=1.0,
        head=True,
        grn=True,
    ):
        super().__init__()
        self.in_chans, self.depths, self.dims = in_chans, tuple(depths), tuple(dims)
        self.grn = grn
        self.downsample_layers = nn.ModuleList(
            [Stem(in_chans, dims[0])] + [Downsample(dims[i - 1], dims[i]) for i in range(1, 4)]
        )
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear from 0
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(
            nn.ModuleList(Block(dims[i], rates[starts[i] + j], grn) for j in range(depths[i]))
            for i in range(4)
        )
        self.feature_info = [
            {"num_chs": dims[i], "reduction": 4 * 2**i, "module": f"stages.{i}"} for i in range(4)
        ]
        self.grad_checkpointing = False
        if head:
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            self.head = _classifier(dims[-1], num_classes)
        self.apply(_init_weights)
        if head and num_classes > 0:
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    @property
    def num_features(self) -> int:
        """Channels of the last stage the model holds."""
        return self.dims[len(self.stages) - 1]

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay besides 1-D ones: GRN's (1, 1, 1, C)."""
        return {"*grn.gamma", "*grn.beta"}

    def set_grad_checkpointing(self, enable=True):
        """Run each block under activation checkpointing (timm's switch): its activations are
        recomputed in the backward pass instead of kept, trading compute for memory."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes):
        """A fresh classifier for ``num_classes`` (0: none, the model gives pooled features),
        as timm's; the final norm stays."""
        if not hasattr(self, "norm"):
            raise ModelError(
                "reset_classifier needs a classifier, but this is a bare encoder (head=False); "
                "create the classifier with fcmae.create_model(name, num_classes=N) and load the "
                "encoder into it with fcmae.weights.layouts.load_into."
            )
        self.head = _classifier(self.num_features, num_classes)
        self.head.apply(_init_weights)
        self.head.to(self.norm.weight)

    def _stages(self, x, mask, backend):
        """Yield (features, sites) after each stage."""
        if mask is not None:
            self._check_mask(x, mask)
        stem_size = (x.shape[-2] // 4, x.shape[-1] // 4)
        sites = stage_sites(mask, stem_size, backend)
        x = self.downsample_layers[0](x, sites[0])
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsample_layers[i](x, sites[i - 1], sites[i])
            for block in stage:
                if self.grad_checkpointing:
                    x = checkpoint(block, x, sites[i], use_reentrant=False)
                else:
                    x = block(x, sites[i])
            yield x, sites[i]

    def forward_stages(self, x, mask=None, backend="sparse", last=None):
        """The stage outputs [(N, dims[i], H / 2^(i+2), W / 2^(i+2))] up to stage ``last``
        (default: every stage), for dense tasks; ``mask`` and ``backend`` as forward_features."""
        stages = self._stages(x, mask, backend)
        if last is not None:
            stages = itertools.islice(stages, last + 1)
        return [sites.exit(features) for features, sites in stages]

    def forward_intermediates(self, x, indices=None, stop_early=False, intermediates_only=False):
        """timm's call: (final features (N, dims[-1], H/32, W/32), [the stage maps of
        ``indices``]), or the maps alone with ``intermediates_only``.

        ``indices``: None, every stage; an int n, the last n; a list, those stages (0-3).
        ``stop_early`` runs no stage after the last one taken (the final features are then
        that stage's). timm's ``norm`` has no counterpart: ConvNeXt's final norm follows the
        pooling, so no map is normalised.
        """
        take = feature_indices(indices, len(self.stages))
        stages = self.forward_stages(x, last=take[-1] if stop_early else None)
        intermediates = [stages[i] for i in take]
        return intermediates if intermediates_only else (stages[-1], intermediates)

    def forward_features(self, x, mask=None, backend="sparse"):
        """(N, in_chans, H, W) -> (N, dims[-1], H/32, W/32).

        With ``mask`` (N, h, w) bool, True = masked patch, the network sees only
        the visible patches: nothing at a visible site depends on masked
        content, and the output is zero at masked sites. ``backend`` is
        ``"sparse"`` (visible sites only), ``"dense"`` (masked-dense reference) or
        ``"minkowski"`` (MinkowskiEngine sparse tensors; see ``fcmae.sites``).
        """
        features, sites = list(self._stages(x, mask, backend))[-1]
        return sites.exit(features)

    def forward_head(self, x, pre_logits=False):
        """(N, C, h, w) -> (N, num_classes), or the normalised pooled (N, C)."""
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        """(N, in_chans, H, W) -> logits (N, num_classes); the bare encoder gives its features."""
        features = self.forward_features(x)
        return self.forward_head(features) if hasattr(self, "head") else features

    def _check_mask(self, x, mask):
        n, _, height, width = x.shape
        if mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[0] != n:
            raise ModelError(
                f"mask must be a bool tensor of shape (N={n}, h, w), got {tuple(mask.shape)} "
                f"{mask.dtype}; pass one flag per patch, True where masked."
            )
        for size, cells, axis in (
            (height, mask.shape[1], "height"),
            (width, mask.shape[2], "width"),
        ):
            if cells == 0 or size % cells or (size // cells) % STRIDE:
                raise ModelError(
                    f"mask has {cells} patches along the image {axis} of {size} px; a patch must "
                    f"be a whole multiple of {STRIDE} px, so use an image {axis} that is a "
                    f"multiple of the patch size."
                )


class ConvNeXtV2Features(ConvNeXtV2):
    """The encoder as timm's ``features_only`` model: the forward gives the maps of the stages
    in ``out_indices``, [(N, dims[i], H / 2^(i+2), W / 2^(i+2))], and ``feature_info`` (timm's
    FeatureInfo) their ``channels()`` and ``reduction()``. Stages after the last index are
    left out, so an encoder checkpoint loads with those keys unused.
    """

    def __init__(self, out_indices=(0, 1, 2, 3), **kwargs):
        super().__init__(head=False, **kwargs)
        self.out_indices = tuple(feature_indices(out_indices))
        kept = self.out_indices[-1] + 1
        del self.downsample_layers[kept:], self.stages[kept:]
        self.feature_info = FeatureInfo(self.feature_info[:kept], self.out_indices)

    def forward(self, x):
        """(N, in_chans, H, W) -> [(N, dims[i], H / 2^(i+2), W / 2^(i+2)) for i in out_indices]."""
        return self.forward_intermediates(x, self.out_indices, intermediates_only=True)


def _classifier(dim, num_classes):
    return nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()


def _init_weights(module):
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
