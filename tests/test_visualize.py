"""Reconstruction panels and the PNG grid of fcmae.pretrain.recon."""

import numpy as np
import pytest
import torch
from helpers import randomize_
from PIL import Image

import fcmae
from fcmae.config.pictures import VisualizeConfig
from fcmae.config.schema import resolve
from fcmae.data.stats import imagenet
from fcmae.data.transforms import normalize
from fcmae.experiments import visualize
from fcmae.pretrain.recon import GAP, HEADER, grid_array, reconstruct, save_grid
from fcmae.run.logs import close_logging, setup_logging


def tiny_fcmae(**kwargs):
    kwargs.setdefault("decoder_dim", 32)
    return fcmae.create_model("fcmae_convnextv2_atto", **kwargs)


def pixel_images(n, in_chans, height, width, seed=0):
    """Random images in [0, 1] pixel space and the same images normalised for the model."""
    pixels = torch.rand(n, in_chans, height, width, generator=torch.Generator().manual_seed(seed))
    return pixels, normalize(imagenet(in_chans))(pixels)


def upsample(mask, n, h, w, p):
    """(N, L) patch mask -> (N, 1, h*p, w*p) pixel mask."""
    return mask.view(n, 1, h, w).repeat_interleave(p, 2).repeat_interleave(p, 3)


def standardised_target(model, imgs):
    """The norm_pix_loss target laid out as forward's pred, (N, p*p*C, h, w)."""
    target = model.patchify(imgs)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return to_pred_layout(model, (target - mean) / (var + 1e-6) ** 0.5, imgs)


def to_pred_layout(model, patches, imgs):
    """(N, L, p*p*C) as patchify gives -> (N, p*p*C, h, w) as forward's pred."""
    n, _, height, width = imgs.shape
    p = model.patch_size
    return patches.transpose(1, 2).reshape(n, patches.shape[-1], height // p, width // p)


def fake_forward(model, make_pred):
    """A forward that returns make_pred(imgs) as pred instead of running the network."""

    def forward(imgs, mask=None, generator=None):
        n, _, height, width = imgs.shape
        if mask is None:
            mask = model.random_mask(n, height, width, generator, imgs.device)
        return torch.zeros(()), make_pred(imgs), mask.float()

    return forward


def test_reconstruction_is_the_original_on_visible_patches_only():
    model = randomize_(tiny_fcmae(), seed=1).train()
    pixels, imgs = pixel_images(2, 3, 64, 96)
    mask = torch.tensor([[1.0, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 1]])
    panels = reconstruct(model, imgs, mask)
    assert model.training  # mode restored
    assert set(panels) == {"original", "masked", "prediction", "reconstruction", "mask"}
    for name in ("original", "masked", "prediction", "reconstruction"):
        assert panels[name].shape == (2, 3, 64, 96) and panels[name].dtype == torch.float32
        assert panels[name].min() >= 0 and panels[name].max() <= 1
    assert torch.allclose(panels["original"], pixels, atol=1e-6)  # un-normalised correctly
    pixel_mask = upsample(mask, 2, 2, 3, 32)
    assert torch.equal(panels["mask"], pixel_mask)
    visible = pixel_mask.bool().logical_not().expand(-1, 3, -1, -1)
    recon, original = panels["reconstruction"], panels["original"]
    assert torch.equal(recon[visible], original[visible])
    assert torch.equal(panels["masked"][visible], original[visible])
    assert (panels["masked"][~visible] == 0.5).all()
    assert torch.equal(recon[~visible], panels["prediction"][~visible])
    # every masked patch of the reconstruction is the (non-trivial) prediction, not the original
    diff = (recon - original).abs().amax(1, keepdim=True)  # (N, 1, H, W)
    per_patch = torch.nn.functional.max_pool2d(diff, 32).flatten(1)  # (N, L)
    assert (per_patch[mask.bool()] > 1e-2).all()
    assert (per_patch[~mask.bool()] == 0).all()
    assert panels["prediction"].std() > 1e-2


def test_random_mask_comes_from_the_model_and_eval_mode_is_kept():
    model = tiny_fcmae(mask_ratio=0.6).eval()
    _, imgs = pixel_images(2, 3, 64, 96)
    first = reconstruct(model, imgs, generator=torch.Generator().manual_seed(5))
    again = reconstruct(model, imgs, generator=torch.Generator().manual_seed(5))
    assert not model.training
    expected = upsample(model.random_mask(2, 64, 96, torch.Generator().manual_seed(5)), 2, 2, 3, 32)
    assert torch.equal(first["mask"], expected)
    assert (first["mask"].flatten(1).mean(1) == 4 / 6).all()  # int(6 * 0.4) = 2 patches kept
    assert torch.equal(first["reconstruction"], again["reconstruction"])


@pytest.mark.parametrize(
    "in_chans, patch_size, size",
    [(3, 32, (64, 96)), (1, 32, (64, 96)), (3, 64, (128, 128)), (1, 64, (128, 128))],
)
def test_a_perfect_norm_pix_prediction_gives_back_the_original(in_chans, patch_size, size):
    model = tiny_fcmae(in_chans=in_chans, patch_size=patch_size, norm_pix_loss=True)
    pixels, imgs = pixel_images(2, in_chans, *size)
    # the layout the fake pred is built in is forward's: unpatchify of it is the image
    raw = to_pred_layout(model, model.patchify(imgs), imgs)
    assert torch.equal(model.unpatchify(raw), imgs)
    h, w = size[0] // patch_size, size[1] // patch_size
    mask = torch.zeros(2, h * w)
    mask[:, ::2] = 1
    model.forward = fake_forward(model, lambda x: standardised_target(model, x))
    panels = reconstruct(model, imgs, mask)
    assert panels["prediction"].shape == (2, in_chans, *size)
    assert torch.allclose(panels["prediction"], pixels, atol=1e-4)
    assert torch.allclose(panels["reconstruction"], pixels, atol=1e-4)

    # and the panel really is the prediction: a wrong patch 0 shows up there only
    def wrong_patch_zero(x):
        pred = standardised_target(model, x).clone()
        pred[:, :, 0, 0] += 1.0
        return pred

    model.forward = fake_forward(model, wrong_patch_zero)
    wrong = reconstruct(model, imgs, mask)["prediction"]
    p = patch_size
    assert not torch.allclose(wrong[:, :, :p, :p], pixels[:, :, :p, :p], atol=1e-2)
    assert torch.allclose(wrong[:, :, p:], pixels[:, :, p:], atol=1e-4)


def test_without_norm_pix_loss_the_prediction_is_taken_as_normalised_pixels():
    model = tiny_fcmae(in_chans=3, norm_pix_loss=False)
    pixels, imgs = pixel_images(2, 3, 64, 64)
    model.forward = fake_forward(model, lambda x: to_pred_layout(model, model.patchify(x), x))
    panels = reconstruct(model, imgs, torch.tensor([[1.0, 1, 0, 1], [0, 0, 0, 1]]))
    assert torch.allclose(panels["prediction"], pixels, atol=1e-5)


def fake_panels(n, in_chans, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    names = ("original", "masked", "prediction", "reconstruction")
    return {k: torch.rand(n, in_chans, height, width, generator=generator) for k in names}


@pytest.mark.parametrize("in_chans", [1, 3])
def test_save_grid_writes_the_grid_as_a_png(tmp_path, in_chans):
    panels = fake_panels(3, in_chans, 64, 96)
    path = save_grid(panels, tmp_path / "deep" / "er" / "grid.png")
    assert path == tmp_path / "deep" / "er" / "grid.png"
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary left behind
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        picture = np.asarray(im)
    # 64x96 tiles are upscaled x2 to 128x192; GAP white pixels between and around them
    assert HEADER >= 14 and GAP >= 2
    assert picture.shape == (HEADER + 3 * 128 + 4 * GAP, 4 * 192 + 5 * GAP, 3)
    assert np.array_equal(picture, grid_array(panels))
    # tile (row 1, column 2) is panel "prediction", image 1, nearest-neighbour upscaled
    y, x = HEADER + GAP + 1 * (128 + GAP), GAP + 2 * (192 + GAP)
    tile = picture[y : y + 128, x : x + 192]
    expected = (panels["prediction"][1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = np.broadcast_to(expected, (64, 96, 3)).repeat(2, 0).repeat(2, 1)
    assert np.array_equal(tile, expected)
    assert (picture[y - GAP : y, x : x + 192] == 255).all()  # the gap above it
    assert (picture[y : y + 128, x - GAP : x] == 255).all()  # the gap left of it
    if in_chans == 1:  # grayscale looks grey
        assert (picture[..., 0] == picture[..., 1]).all() and (
            picture[..., 1] == picture[..., 2]
        ).all()
    # each column's name is drawn in the header, above its own column
    for j in range(4):
        band = picture[:HEADER, GAP + j * (192 + GAP) : (j + 1) * (192 + GAP)]
        assert (band < 128).any()


def test_large_tiles_are_not_upscaled_and_columns_can_be_chosen(tmp_path):
    panels = fake_panels(2, 3, 128, 128)
    panels["mask"] = torch.zeros(2, 1, 128, 128)
    picture = grid_array(panels, ("original", "mask"))
    assert picture.shape == (HEADER + 2 * 128 + 3 * GAP, 2 * 128 + 3 * GAP, 3)
    with pytest.raises(KeyError, match="missing"):
        grid_array(panels, ("original", "missing"))


def test_the_job_draws_the_model_the_checkpoint_was_trained_as(tmp_path, capsys):
    trained = randomize_(
        tiny_fcmae(patch_size=64, mask_ratio=0.5, norm_pix_loss=False), seed=1, scale=0.05
    )
    settings = {"patch_size": 64, "mask_ratio": 0.5, "norm_pix_loss": False, "input_size": 128}
    torch.save({"model": trained.state_dict(), "config": settings}, tmp_path / "ckpt.pth")
    flags = {"checkpoint": str(tmp_path / "ckpt.pth"), "images": 2, "device": "cpu"}
    handlers = setup_logging(None, 0)  # the console logging the CLI sets up
    try:
        output = visualize.run(resolve(VisualizeConfig, flags=flags))
    finally:
        close_logging(handlers)
    assert output == tmp_path / "ckpt-recon.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-recon.png", "ckpt.pth"]
    said = capsys.readouterr().out
    assert "2 images of 128 px, 2 of 4 patches of 64 px masked (mask ratio 0.5), seed 0" in said
    with Image.open(output) as png:
        assert png.size == (4 * 128 + 5 * GAP, HEADER + 2 * 128 + 3 * GAP)
