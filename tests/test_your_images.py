"""Images of any channel count and bit depth, their own statistics, a head start from published
weights (issue 25): files written here (5-channel 16-bit TIFF, 13-channel float .npy, shards of
both), read back exactly, trained on end to end through the CLI; every bad input one sentence
with nothing written."""

import io
import json
import tarfile

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torchvision import transforms as T

from fcmae.cli import main
from fcmae.data.images import Decoding, PixelError
from fcmae.data.sources import data_source, settle_stats
from fcmae.data.stats import imagenet
from fcmae.data.transforms import pretrain_transform
from fcmae.errors import UserError
from fcmae.run.checkpoint import read

TINY = ["--input-size", "64", "--batch-size", "4", "--effective-batch", "none", "--epochs", "1"]
TINY += ["--warmup-epochs", "0", "--num-workers", "0", "--recon-every", "1"]


def tiff(path, chans=5, size=(40, 48), seed=0, base=3000):
    """A chans-channel 16-bit TIFF (planar), its pixels returned."""
    pixels = np.random.default_rng(seed).integers(base, base + 20000, (chans, *size), np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    planar = "separate" if chans > 1 else None
    tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig=planar)
    return pixels


def npy(path, chans=13, size=(48, 40), seed=0, centre=0.3):
    """A chans-channel float32 .npy in (H, W, C), its pixels returned as (C, H, W)."""
    pixels = np.random.default_rng(seed).normal(centre, 0.1, (*size, chans)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, pixels)
    return pixels.transpose(2, 0, 1)


def labelled(root, write, per_class=4):
    """root/{train,val}/{a,b}/ of files that write(path, seed, class index) makes."""
    for split in ("train", "val"):
        for c, name in enumerate("ab"):
            for i in range(per_class):
                write(root / split / name, i + 10 * c + 100 * (split == "val"), c)
    return root


def write_tiff(folder, seed, c):
    tiff(folder / f"{seed}.tif", seed=seed, base=3000 + 20000 * c)


def write_npy(folder, seed, c):
    npy(folder / f"{seed}.npy", seed=seed, centre=0.2 + 0.5 * c)


def said(capsys):
    """The error sentence of the last command; it must be one line."""
    err = capsys.readouterr().err
    assert err.startswith("fcmae: error: ") and err.count("\n") == 1, err
    return err


# --- reading at full precision ----------------------------------------------------------------


def test_a_16_bit_image_keeps_its_65536_levels(tmp_path):
    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    colour = np.stack([levels, levels[::-1], levels.T], axis=-1)
    (tmp_path / "colour16.png").write_bytes(imagecodecs.png_encode(colour))
    grey = Decoding.for_model(1)(tmp_path / "grey16.png")
    assert grey.dtype == np.float32 and np.unique(grey).size == 65536
    assert np.array_equal(np.round(grey[0] * 65535).astype(np.uint16), levels)
    rgb = Decoding.for_model(3)(tmp_path / "colour16.png")  # Pillow alone would keep 256
    assert np.array_equal(np.round(rgb * 65535).astype(np.uint16), colour.transpose(2, 0, 1))


def test_multi_channel_and_multi_page_tiffs_and_npy_layouts_keep_every_value(tmp_path):
    pixels = tiff(tmp_path / "planar.tif")
    tifffile.imwrite(tmp_path / "contig.tif", pixels.transpose(1, 2, 0), planarconfig="contig")
    with tifffile.TiffWriter(tmp_path / "pages.tif") as pages:
        for page in pixels:
            pages.write(page, photometric="minisblack")
    five = Decoding.for_model(5)
    for name in ("planar.tif", "contig.tif", "pages.tif"):
        assert np.array_equal(five(tmp_path / name), pixels / np.float32(65535)), name
    chw = np.random.default_rng(1).normal(size=(13, 20, 24)).astype(np.float32)
    np.save(tmp_path / "chw.npy", chw)
    np.save(tmp_path / "hwc.npy", chw.transpose(1, 2, 0))
    np.save(tmp_path / "int16.npy", (chw[0] * 1000).astype(np.int16))  # signed: as it is
    thirteen = Decoding.for_model(13)
    assert np.array_equal(thirteen(tmp_path / "chw.npy"), chw)
    assert np.array_equal(thirteen(tmp_path / "hwc.npy"), chw)
    assert np.array_equal(
        Decoding.for_model(1)(tmp_path / "int16.npy")[0], (chw[0] * 1000).astype(np.int16)
    )


@pytest.mark.parametrize(
    "content, in_chans, message",
    [
        ("tiff4", 5, "holds 4 channels (uint16, 40x48) but --in-chans is 5"),
        ("nan", 13, "holds 1 NaN and 0 infinite pixel values (float32)"),
        ("square", 13, "has shape (13, 40, 13), so which axis holds its channels is unclear"),
        ("text", 1, "holds a <U1 array of shape (4, 4); save images as numbers"),
    ],
)
def test_a_file_the_run_cannot_use_is_refused_naming_it(tmp_path, content, in_chans, message):
    if content == "tiff4":
        path = tmp_path / "x.tif"
        tiff(path, chans=4)
    else:
        path = tmp_path / "x.npy"
        array = {
            "nan": np.ones((13, 20, 24), np.float32),
            "square": np.zeros((13, 40, 13), np.float32),
            "text": np.full((4, 4), "a"),
        }[content]
        if content == "nan":
            array[3, 2, 1] = np.nan
        np.save(path, array)
    with pytest.raises(PixelError) as refused:
        Decoding.for_model(in_chans)(path)
    assert str(path) in str(refused.value) and message in str(refused.value)


def test_8_bit_photographs_keep_their_path_and_its_numbers(tmp_path):
    # The RGB JPEG/PNG path is torchvision's PIL pipeline, step for step: same draws, same tensor.
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8))
    photo.save(tmp_path / "a.png")
    decoded = Decoding.for_model(3)(tmp_path / "a.png")
    assert isinstance(decoded, Image.Image) and decoded.mode == "RGB"
    plain = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    torch.manual_seed(3)
    ours = pretrain_transform(32, imagenet(3))(decoded)
    torch.manual_seed(3)
    assert torch.equal(ours, plain(photo))


def test_data_statistics_equal_numpys_on_the_files(tmp_path):
    images = [tiff(tmp_path / f"{i}.tif", size=(30 + 4 * i, 40), seed=i) for i in range(5)]
    cfg = type("Cfg", (), {"pixel_stats": "data", "in_chans": 5, "seed": 0})()
    settle_stats(cfg, data_source(str(tmp_path)), Decoding.for_model(5), None, main=True)
    pixels = np.concatenate([i.reshape(5, -1) / 65535.0 for i in images], axis=1)
    mean, std = cfg.pixel_stats.split(":")
    assert np.allclose([float(v) for v in mean.split(",")], pixels.mean(1), rtol=1e-6, atol=0)
    assert np.allclose([float(v) for v in std.split(",")], pixels.std(1), rtol=1e-6, atol=0)


# --- end to end through the CLI ---------------------------------------------------------------


def test_five_channel_16_bit_tiffs_pretrain_finetune_probe_export_and_visualize(tmp_path):
    data = labelled(tmp_path / "data", write_tiff)
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert main(["pretrain", "--data", str(data / "train"), "--in-chans", "5", *TINY,
                 "--display-channels", "3,2,1", "--output-dir", str(pre)]) == 0  # fmt: skip
    config = read(pre / "checkpoints" / "checkpoint-0001.pth")["config"]
    mean, std = config["pixel_stats"].split(":")
    assert len(mean.split(",")) == len(std.split(",")) == 5  # measured, recorded
    assert (pre / "recon" / "epoch-0001.png").is_file()
    encoder = str(pre / "checkpoints" / "encoder-0001.pth")
    assert main(["finetune", "--pretrained", encoder, "--data", str(data), "--in-chans", "5",
                 *TINY[:-2], "--output-dir", str(ft)]) == 0  # fmt: skip
    assert (
        read(ft / "checkpoints" / "checkpoint-0001.pth")["config"]["pixel_stats"]
        == (
            config["pixel_stats"]  # the encoder sees its data as in pretraining
        )
    )
    assert main(["linprobe", "--pretrained", encoder, "--data", str(data), "--in-chans", "5",
                 *TINY[:-2], "--output-dir", str(tmp_path / "lp")]) == 0  # fmt: skip
    assert main(["knn", "--pretrained", encoder, "--data", str(data), "--input-size", "64"]) == 0
    classifier = str(ft / "checkpoints" / "checkpoint-0001.pth")
    assert main(["eval", "--checkpoint", classifier, "--data", str(data / "val"),
                 "--input-size", "64"]) == 0  # fmt: skip
    assert main(["export", "--checkpoint", classifier, "--hub-dir", str(tmp_path / "hub")]) == 0
    hub = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert hub["pretrained_cfg"]["mean"] == [float(v) for v in mean.split(",")]
    picture = tmp_path / "recon.png"
    assert main(["visualize", "--checkpoint", str(pre / "checkpoints" / "checkpoint-0001.pth"),
                 "--data", str(data / "val"), "--display-channels", "5",
                 "--output", str(picture)]) == 0  # fmt: skip
    assert Image.open(picture).mode == "RGB"


def test_thirteen_channel_float_npy_pretrain_finetune_probe_and_visualize(tmp_path):
    data = labelled(tmp_path / "data", write_npy)
    pre = tmp_path / "pre"
    assert main(["pretrain", "--data", str(data / "train"), "--in-chans", "13", *TINY,
                 "--output-dir", str(pre)]) == 0  # fmt: skip
    encoder = str(pre / "checkpoints" / "encoder-0001.pth")
    for command in ("finetune", "linprobe"):
        assert main([command, "--pretrained", encoder, "--data", str(data), "--in-chans", "13",
                     *TINY[:-2], "--output-dir", str(tmp_path / command)]) == 0  # fmt: skip
    picture = tmp_path / "recon.png"
    assert main(["visualize", "--checkpoint", str(pre / "checkpoints" / "checkpoint-0001.pth"),
                 "--data", str(data / "val"), "--display-channels", "13,7,1",
                 "--output", str(picture)]) == 0  # fmt: skip
    assert Image.open(picture).size[0] > 0


def shard(path, files):
    """A WebDataset tar shard of {name: bytes}."""
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def encoded(kind, seed, chans):
    buffer = io.BytesIO()
    if kind == "tif":
        pixels = np.random.default_rng(seed).integers(0, 65535, (chans, 40, 48), np.uint16)
        tifffile.imwrite(buffer, pixels, photometric="minisblack", planarconfig="separate")
    else:
        np.save(buffer, np.random.default_rng(seed).normal(size=(chans, 48, 40)).astype("f4"))
    return buffer.getvalue()


@pytest.mark.parametrize("kind, chans", [("tif", 5), ("npy", 13)])
def test_shards_of_tiffs_and_arrays_pretrain(tmp_path, kind, chans):
    files = {f"{i:06d}.{kind}": encoded(kind, i, chans) for i in range(8)}
    tar = shard(tmp_path / "train-000000.tar", files)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(tar), "--in-chans", str(chans), *TINY,
                 "--output-dir", str(run)]) == 0  # fmt: skip
    assert (run / "checkpoints" / "checkpoint-0001.pth").is_file()


# --- bad input: one sentence, nothing written ---------------------------------------------


@pytest.mark.parametrize(
    "case, message",
    [
        ("mixed", "holds 4 channels (uint16, 40x48) but --in-chans is 5"),
        ("nan", "holds 1 NaN and 0 infinite pixel values"),
        ("constant", "Channel 3 has standard deviation 0.0 in the images of --data"),
        ("display", "--display-channels '6' must name three channels"),
        ("count", "--pixel-stats gives 2 means for --in-chans 5"),
        ("std", "Channel 2 has standard deviation 0.0 in --pixel-stats"),
        ("imagenet", "--pixel-stats imagenet holds statistics of 3 (or 1) channels"),
        ("demo", "The embedded demo photos have 3 channels, not --in-chans 5"),
    ],
)
def test_bad_image_input_is_one_sentence_and_writes_nothing(tmp_path, capsys, case, message):
    data = tmp_path / "data"
    for i in range(4):
        tiff(data / f"{i}.tif", seed=i)
    args = ["pretrain", "--data", str(data), "--in-chans", "5", *TINY]
    if case == "mixed":
        tiff(data / "9.tif", chans=4)
    elif case == "nan":
        bad = np.ones((40, 48, 5), np.float32)
        bad[1, 2, 3] = np.nan
        np.save(data / "5.npy", bad)
    elif case == "constant":
        for i in range(4):
            pixels = tiff(data / f"{i}.tif", seed=i)
            pixels[2] = 7
            tifffile.imwrite(data / f"{i}.tif", pixels, photometric="minisblack")
    elif case == "display":
        args += ["--display-channels", "6"]
    elif case == "count":
        args += ["--pixel-stats", "0.1,0.2:0.3,0.4"]
    elif case == "std":
        args += ["--pixel-stats", "0,0,0,0,0:1,0,1,1,1"]
    elif case == "imagenet":
        args += ["--pixel-stats", "imagenet"]
    else:
        args = ["pretrain", "--in-chans", "5", *TINY]
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 1
    assert message in said(capsys)
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_keeps_its_recorded_statistics(tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(4):
        tiff(data / f"{i}.tif", seed=i)
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(data), "--in-chans", "5", *TINY, "--output-dir", str(run)]
    assert main(args) == 0
    recorded = read(run / "checkpoints" / "checkpoint-0001.pth")["config"]["pixel_stats"]
    for i in range(4, 8):  # new images that would move the statistics
        tiff(data / f"{i}.tif", seed=i, base=40000)
    capsys.readouterr()
    assert main([*args[:-2], "--epochs", "2", "--output-dir", str(run)]) == 0
    assert read(run / "checkpoints" / "checkpoint-0002.pth")["config"]["pixel_stats"] == recorded
    assert "Pixel statistics as the run recorded them" in (run / "log.txt").read_text()


# --- a head start from RGB weights --------------------------------------------------------


def test_init_from_an_rgb_checkpoint_adapts_its_stem_and_is_read_once(tmp_path, capsys):
    rgb = tmp_path / "rgb"
    assert main(["pretrain", *TINY, "--demo-images", "4", "--output-dir", str(rgb)]) == 0
    source = tmp_path / "source.pth"
    source.write_bytes((rgb / "checkpoints" / "checkpoint-0001.pth").read_bytes())
    data = tmp_path / "data"
    for i in range(4):
        tiff(data / f"{i}.tif", chans=1, seed=i)
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(data), "--in-chans", "1", *TINY, "--output-dir", str(run)]
    assert main([*args, "--init", str(source)]) == 0
    log = (run / "log.txt").read_text()
    assert "3 -> 1 channels: stem kernels summed" in log
    assert "decoder from the file" in log and "pred.weight" in log
    source.unlink()  # a resume continues from the run's checkpoint, never from --init
    args[args.index("--epochs") + 1] = "2"
    assert main([*args, "--init", str(source)]) == 0
    assert (run / "checkpoints" / "checkpoint-0002.pth").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("size", "pass --model convnextv2_femto"),
        ("not a network", "holds no ConvNeXt V2 or FCMAE weights of a known size"),
    ],
)
def test_a_bad_init_is_one_sentence_and_writes_nothing(tmp_path, capsys, case, message):
    import fcmae

    path = tmp_path / "init.pth"
    if case == "size":
        torch.save({"model": fcmae.create_model("convnextv2_femto", head=False).state_dict()}, path)
    else:
        torch.save({"model": {"weights": torch.zeros(3)}}, path)
    args = ["pretrain", *TINY, "--demo-images", "4", "--init", str(path)]
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 1
    assert message in said(capsys)
    assert not (tmp_path / "run").exists()


def test_a_run_from_before_the_new_options_resumes_as_it_was_trained(tmp_path):
    from fcmae.config.yaml_io import load_yaml, write_yaml
    from fcmae.run.checkpoint import save_atomic

    run = tmp_path / "run"
    args = ["pretrain", *TINY, "--demo-images", "4", "--output-dir", str(run)]
    assert main(args) == 0
    new = ("pixel_stats", "init", "display_channels")  # what an older fcmae did not record
    path = run / "checkpoints" / "checkpoint-0001.pth"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"] = {k: v for k, v in checkpoint["config"].items() if k not in new}
    del checkpoint["digest"]  # written anew over the edited content
    save_atomic(checkpoint, path)
    config = {k: v for k, v in load_yaml(run / "config.yaml").items() if k not in new}
    write_yaml(config, run / "config.yaml")
    record = load_yaml(run / "identity.yaml")
    record["settings"] = {k: v for k, v in record["settings"].items() if k not in new}
    write_yaml(record, run / "identity.yaml")
    args[args.index("--epochs") + 1] = "2"
    assert main(args) == 0  # no --accept-changes: the old run was normalised with ImageNet's
    assert read(run / "checkpoints" / "checkpoint-0002.pth")["config"]["pixel_stats"] == "imagenet"


def test_array_layouts_the_hostile_review_found(tmp_path):
    big_endian = np.arange(64, dtype=">u2").reshape(8, 8) * 1000
    np.save(tmp_path / "be.npy", big_endian)  # FITS-derived arrays are big-endian
    expected = big_endian.astype(np.float32) / np.float32(65535)
    assert np.array_equal(Decoding.for_model(1)(tmp_path / "be.npy")[0], expected)
    cube = np.random.default_rng(0).normal(size=(40, 32, 32)).astype(np.float32)
    np.save(tmp_path / "cube.npy", cube)  # 40 bands of 32x32: more channels than columns
    assert np.array_equal(Decoding.for_model(40)(tmp_path / "cube.npy"), cube)
    np.save(tmp_path / "empty.npy", np.zeros((2, 0, 64), np.float32))
    with pytest.raises(PixelError, match="holds no pixels"):
        Decoding.for_model(2)(tmp_path / "empty.npy")


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.5,0.5:1e-45,0.2", "Channel 1 has standard deviation 1e-45 in --pixel-stats"),
        ("1e39,0.5:0.2,0.2", "--pixel-stats means must lie within +-1e+12"),
        ("0,0:1.2e-38,1", "Channel 1 has standard deviation 1.2e-38 in --pixel-stats"),
    ],
)
def test_statistics_that_would_overflow_the_network_are_refused(tmp_path, capsys, value, message):
    args = ["pretrain", "--in-chans", "2", *TINY, "--pixel-stats", value]
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 1
    assert message in said(capsys) and not (tmp_path / "run").exists()


def test_a_negative_first_mean_is_one_value_and_the_spelling_is_one(tmp_path):
    from fcmae.config.commands import PretrainConfig
    from fcmae.config.schema import resolve

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        np.save(data / f"{i}.npy", np.random.default_rng(i).normal(-9, 2, (2, 40, 48)).astype("f4"))
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(data), "--in-chans", "2", *TINY, "--output-dir", str(run)]
    assert main([*args, "--pixel-stats", "-9.7, -9.0 : 2,2"]) == 0
    assert read(run / "checkpoints" / "checkpoint-0001.pth")["config"]["pixel_stats"] == (
        "-9.7,-9.0:2.0,2.0"
    )
    cfg = resolve(PretrainConfig, flags={"in_chans": 2, "pixel_stats": "-9.70,-9:2,2.0"})
    assert cfg.pixel_stats == "-9.7,-9.0:2.0,2.0"  # the same run: a resume accepts it


def test_exports_carry_the_statistics_to_whoever_reads_them(tmp_path):
    data = labelled(tmp_path / "data", write_npy, per_class=2)
    pre = tmp_path / "pre"
    assert main(["pretrain", "--data", str(data / "train"), "--in-chans", "13", *TINY,
                 "--output-dir", str(pre)]) == 0  # fmt: skip
    stats = read(pre / "checkpoints" / "checkpoint-0001.pth")["config"]["pixel_stats"]
    exported = tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(pre / "checkpoints" / "encoder-0001.pth"),
                 "--output", str(exported)]) == 0  # fmt: skip
    from fcmae.weights.layouts import read_weights

    assert read_weights(str(exported)).pixel_stats == stats
    ft = tmp_path / "ft"
    assert main(["finetune", "--pretrained", str(exported), "--data", str(data),
                 "--in-chans", "13", *TINY[:-2], "--output-dir", str(ft)]) == 0  # fmt: skip
    ema = read_weights(str(ft / "checkpoints" / "ema-0001.pth"))
    assert ema.pixel_stats == stats  # what fcmae eval of the EMA file normalises with


def test_a_tiff_of_many_blank_pages_is_skipped_not_decoded(tmp_path):
    with tifffile.TiffWriter(tmp_path / "bomb.tif") as tif:  # a few MB on disk
        for _ in range(9):
            tif.write(np.zeros((9000, 9000), np.uint8), compression="zlib")
    with pytest.raises(ValueError, match="exceed the limit against decompression bombs"):
        Decoding.for_model(9)(tmp_path / "bomb.tif")


def test_a_change_accepted_on_an_old_run_is_measured_against_what_it_did():
    from fcmae.run import identity

    # An old run's checkpoint lacks pixel_stats; a later start accepted another value and
    # failed before its first checkpoint. The original command is the run as it was.
    checkpoint = identity.Record("checkpoint-0001.pth", {"seed": 0})
    record = identity.Record(
        "identity.yaml", {"seed": 0, "pixel_stats": "0,0,0:2,2,2"}, "fcmae pretrain",
        {"pixel_stats": "imagenet"},
    )  # fmt: skip
    values = {"seed": 0, "pixel_stats": "imagenet"}
    legacy = {"pixel_stats": "imagenet"}
    keys = ("seed", "pixel_stats")
    where = "The run"
    assert (
        identity.check("fcmae pretrain", values, keys, (), [checkpoint, record], where, legacy)
        == {}
    )
    with pytest.raises(UserError, match="pixel_stats '\\(unrecorded\\)' -> 'imagenet'"):
        identity.check("fcmae pretrain", values, keys, (), [checkpoint], where)
