"""FCMAE: a fully convolutional masked autoencoder around the ConvNeXt V2 core.

The encoder sees only the visible patches (sparse execution of the core), a
light decoder (one ConvNeXt V2 block) fills masked sites with a learned token
and predicts the pixels of every patch; the loss is taken on masked patches.
"""

import torch
from einops import rearrange
from torch import nn

from fcmae.models.convnextv2 import Block, ConvNeXtV2, _init_weights
from fcmae.models.errors import ModelError
from fcmae.models.masking import STRIDE, masked_patches
from fcmae.sites import backend_class
from fcmae.sites.grid import GridSites


class FCMAE(nn.Module):
    def __init__(
        self,
        depths,
        dims,
        in_chans=3,
        patch_size=32,
        mask_ratio=0.6,
        decoder_depth=1,
        decoder_dim=512,
        norm_pix_loss=True,
        backend="sparse",
        grn=True,
    ):
        super().__init__()
        if patch_size <= 0 or patch_size % STRIDE:
            raise ModelError(
                f"patch_size {patch_size} is not a multiple of {STRIDE}; use 32, 64, ..."
            )
        backend_class(backend)  # refuses an unknown name
        self.patch_size, self.in_chans, self.backend = patch_size, in_chans, backend
        self.mask_ratio = mask_ratio  # validated by the property setter
        self.norm_pix_loss = norm_pix_loss
        self.encoder = ConvNeXtV2(in_chans=in_chans, depths=depths, dims=dims, head=False, grn=grn)
        # The decoder runs on the encoder's final grid (one site per 32x32
        # pixels) and predicts those pixels; with larger patches a patch
        # spans several sites.
        self.proj = nn.Conv2d(dims[-1], decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.ModuleList(Block(decoder_dim, grn=grn) for _ in range(decoder_depth))
        self.pred = nn.Conv2d(decoder_dim, STRIDE * STRIDE * in_chans, kernel_size=1)
        for module in (self.proj, self.decoder, self.pred):
            module.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The encoder's and decoder's GRN parameters, and the mask token."""
        return {"*grn.gamma", "*grn.beta", "mask_token"}

    def set_grad_checkpointing(self, enable=True):
        """Recompute the encoder's blocks in the backward pass instead of keeping their
        activations (the light decoder keeps its own)."""
        self.encoder.set_grad_checkpointing(enable)

    @property
    def mask_ratio(self):
        return self._mask_ratio

    @mask_ratio.setter
    def mask_ratio(self, ratio):
        if not 0 < ratio < 1:
            raise ModelError(f"mask_ratio {ratio} is outside (0, 1); the paper's recipe uses 0.6.")
        self._mask_ratio = ratio

    def random_mask(self, n, height, width, generator=None, device=None):
        """(N, h*w) float, 1 = masked: int(L * (1 - mask_ratio)) patches kept per
        sample, chosen uniformly at random (``generator`` makes it repeatable)."""
        h, w = height // self.patch_size, width // self.patch_size
        keep = h * w - masked_patches(h * w, self.mask_ratio)
        noise = torch.rand(
            n,
            h * w,
            generator=generator,
            device=generator.device if generator is not None else device,
        )
        ranks = noise.argsort(dim=1).argsort(dim=1)
        return (ranks >= keep).float().to(device)

    def patchify(self, imgs):
        """(N, C, H, W) -> (N, L, p*p*C), each patch flattened as (row, col, channel)."""
        p = self.patch_size
        return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)

    def unpatchify(self, pred):
        """pred (N, p*p*C, h, w), as forward returns it -> images (N, C, h*p, w*p)."""
        p = self.patch_size
        return rearrange(pred, "n (p q c) h w -> n c (h p) (w q)", p=p, q=p)

    def forward_encoder(self, imgs, mask):
        """(N, C, H, W), mask (N, L) -> (N, dims[-1], H/32, W/32), zero at masked sites."""
        n, _, height, width = imgs.shape
        patch_mask = mask.bool().view(n, height // self.patch_size, width // self.patch_size)
        return self.encoder.forward_features(imgs, patch_mask, self.backend)

    def forward_decoder(self, features, mask):
        """(N, D, H/32, W/32), mask (N, L) -> pred (N, p*p*C, H/p, W/p)."""
        x = self.proj(features)
        n, _, height, width = x.shape
        scale = self.patch_size // STRIDE
        site_mask = mask.view(n, 1, height // scale, width // scale)
        site_mask = site_mask.repeat_interleave(scale, 2).repeat_interleave(scale, 3).to(x.dtype)
        x = x * (1 - site_mask) + self.mask_token.to(x.dtype) * site_mask
        x = x.permute(0, 2, 3, 1)
        for block in self.decoder:
            x = block(x, GridSites())
        pred = self.pred(x.permute(0, 3, 1, 2))
        if scale > 1:  # regroup the 32x32 predictions into patches
            pred = rearrange(pred, "n (p q c) h w -> n c (h p) (w q)", p=STRIDE, q=STRIDE)
            pred = rearrange(
                pred, "n c (h p) (w q) -> n (p q c) h w", p=self.patch_size, q=self.patch_size
            )
        return pred

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over masked patches."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        pred = pred.flatten(2).transpose(1, 2)
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask=None, generator=None):
        """imgs (N, C, H, W), H and W multiples of patch_size; mask (N, L) with
        1 = masked (random when None). Returns (loss, pred (N, p*p*C, h, w), mask (N, L))."""
        self._check_input(imgs)
        n, _, height, width = imgs.shape
        if mask is None:
            mask = self.random_mask(n, height, width, generator, imgs.device)
        else:
            mask = self._check_mask(mask, n, height, width).to(imgs.device)
        pred = self.forward_decoder(self.forward_encoder(imgs, mask), mask)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def _check_input(self, imgs):
        if imgs.dim() != 4 or imgs.shape[1] != self.in_chans:
            raise ModelError(
                f"expected images of shape (N, {self.in_chans}, H, W), got {tuple(imgs.shape)}; "
                f"set in_chans to the number of image channels."
            )
        height, width = imgs.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ModelError(
                f"image size {height}x{width} is not a multiple of the patch size "
                f"{self.patch_size}; resize or crop to a multiple of {self.patch_size}."
            )

    def _check_mask(self, mask, n, height, width):
        length = (height // self.patch_size) * (width // self.patch_size)
        if tuple(mask.shape) != (n, length):
            raise ModelError(
                f"mask has shape {tuple(mask.shape)} but these images need ({n}, {length}): "
                f"one entry per {self.patch_size}x{self.patch_size} patch, 1 where masked."
            )
        if mask.dtype.is_complex or not ((mask == 0) | (mask == 1)).all():
            raise ModelError("mask must hold only 0/1 (or False/True), 1 where a patch is masked.")
        if not mask.any():
            raise ModelError(
                "mask hides no patch, so there is nothing to reconstruct; mask at least one patch."
            )
        return mask.float()
