"""Input bounded before it is used: YAML that cannot expand, every integer option below what its
consumer takes, runs that cannot fit in memory refused before any model is built, and messages
that never quote a huge input whole."""

import dataclasses
import time
import typing

import pytest

import fcmae
from fcmae.cli import COMMANDS, main
from fcmae.config import budget
from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.config.yaml_io import parse_yaml
from fcmae.errors import ConfigError

MEMORY_KNOWN = pytest.mark.skipif(
    budget.physical_memory() is None, reason="this system does not say how much RAM it has"
)


def refusal(capsys, argv):
    """The one line that `fcmae ARGV --print-config` refuses with (it must refuse)."""
    assert main([*argv, "--print-config"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("fcmae: error: ") and err.count("\n") == 1 and err.endswith(".\n"), err
    return err


def billion_laughs(path, levels=9):
    """A 460-byte YAML file whose nested aliases expand to 9**levels strings, under a key that
    an error message would quote."""
    lines = ["epochs:", "- &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"- &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_billion_laughs_config_is_refused_at_once_in_one_short_sentence(tmp_path, capsys):
    path = billion_laughs(tmp_path / "laughs.yaml")
    assert path.stat().st_size < 500
    start = time.monotonic()
    err = refusal(capsys, ["pretrain", "--config", str(path)])
    assert time.monotonic() - start < 5
    assert "laughs.yaml" in err and "alias (*a0 on line 3)" in err and len(err) < 300


@pytest.mark.parametrize(
    "text, says",
    [
        ("epochs: &e 3\nsave_every: *e\n", "uses a YAML alias (*e on line 2)"),
        ("base: &b {epochs: 3}\nmerged:\n  <<: *b\n", "uses a YAML alias (*b on line 3)"),
        ("epochs: " + "[" * 5000 + "]" * 5000 + "\n", "nests its values too deeply"),
        ("seed: " + "9" * 5000 + "\n", "holds a value that cannot be read"),
        ("seed: 1\nseed: 2\n", "gives the key 'seed' twice (again on line 2)"),
        ("a: [1\n", "is not valid YAML"),
        ("x" * 1_000_001, "is longer than 1000000 characters"),
    ],
)
def test_parse_yaml_refuses_in_one_sentence_naming_the_source(text, says):
    with pytest.raises(ConfigError) as e:
        parse_yaml(text, "settings.yaml")
    message = str(e.value)
    assert message.startswith(f"settings.yaml {says}") and message.endswith(".")
    assert "\n" not in message and len(message) < 400


def test_parse_yaml_reads_plain_yaml_and_anchors_without_aliases():
    assert parse_yaml("a: &x 1\nb: [2, 3]\n", "s") == {"a": 1, "b": [2, 3]}
    assert parse_yaml("", "s") is None


def test_a_config_file_that_cannot_be_read_is_a_sentence(tmp_path, capsys):
    path = tmp_path / "locked.yaml"
    path.write_text("epochs: 3\n")
    path.chmod(0)
    try:
        path.read_text()
        pytest.skip("this user reads files without read permission (root)")
    except PermissionError:
        pass
    assert "cannot be read (Permission denied)" in refusal(capsys, ["pretrain", "--config", path])


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["pretrain", "--device", "x" * 100_000], "got 'xxx"),
        (["pretrain", "--accept-changes", "y" * 100_000], "accept_changes names yyy"),
        (["finetune", "--auto-augment", "z" * 100_000], "got 'zzz"),
    ],
)
def test_a_huge_value_is_quoted_shortened(capsys, argv, shown):
    err = refusal(capsys, argv)
    assert shown in err and "..." in err and len(err) < 600


@pytest.mark.parametrize(
    "text",
    [
        "model: " + "m" * 100_000 + "\n",
        "? " + "k" * 100_000 + "\n: 1\n",  # an explicit key: a plain one stops at 1024
        "epochs: [" + "1, " * 40_000 + "1]\n",
    ],
)
def test_a_huge_value_in_a_config_file_is_quoted_shortened(tmp_path, capsys, text):
    path = tmp_path / "big.yaml"
    path.write_text(text)
    err = refusal(capsys, ["pretrain", "--config", str(path)])
    assert "big.yaml" in err and len(err) < 1000  # the known keys take 400


def test_an_integer_beyond_floats_for_a_number_key_is_not_finite(tmp_path, capsys):
    path = tmp_path / "blr.yaml"
    path.write_text("blr: " + "9" * 400 + "\n")
    assert "--blr must be a finite number, got inf." in refusal(
        capsys, ["pretrain", "--config", str(path)]
    )


def _integer_options():
    """(command, field) of every integer option that takes a range (not a list of choices)."""
    found = []
    for name, command in COMMANDS.items():
        hints = typing.get_type_hints(command.config)
        for f in dataclasses.fields(command.config):
            if int in (hints[f.name], *typing.get_args(hints[f.name])) and not f.metadata.get(
                "choices"
            ):
                found.append((name, f))
    return found


INTEGERS = _integer_options()


@pytest.mark.parametrize("name, f", INTEGERS, ids=[f"{n} {f.name}" for n, f in INTEGERS])
def test_every_integer_option_has_an_upper_bound_said_with_its_reason(capsys, name, f):
    within = f.metadata["within"]
    assert within.high <= 2**63 and within.why, f"{name} --{f.name} needs a declared bound"
    above = within.high + 1 if within.high_closed else within.high
    err = refusal(capsys, [name, f"--{f.name.replace('_', '-')}", str(above)])
    assert f"{f.name} must lie in " in err and f"({within.why})" in err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["pretrain", "--seed", str(2**70)], "seed must lie in [0, 2**63) (torch seeds"),
        (["finetune", "--seed", "99999999999999999999"], "seed must lie in [0, 2**63)"),
        (["visualize", "--seed", str(2**64)], "seed must lie in [0, 2**63)"),
        (["pretrain", "--num-workers", str(10**9)], "num_workers must lie in [0, 128]"),
        (["pretrain", "--epochs", str(10**30)], "epochs must lie in (0, 2**63)"),
        (["linprobe", "--keep-last", str(10**30)], "keep_last must lie in (0, 2**63)"),
        (["knn", "--k", str(10**30)], "k must lie in (0, 2**63)"),
        (["pretrain", "--dist-timeout", "1e12"], "dist_timeout must lie in (0, 9e+09]"),
        (["finetune", "--lr", "1e300"], "AdamW's step (1e+301) overflows a float32"),
        (["pretrain", "--blr", "1e300"], "lower --lr or --blr"),
    ],
)
def test_numbers_beyond_what_their_consumer_takes_are_refused(capsys, argv, says):
    assert says in refusal(capsys, argv)


def test_the_largest_seed_trains_and_one_more_is_refused(tmp_path, capsys):
    """torch takes seed + epoch below 2**64: the largest seed allowed seeds every generator
    (numpy's, the sampler's, the reconstructions' masks); beyond it, a sentence."""
    argv = ["pretrain", "--output-dir", str(tmp_path / "run"), "--device", "cpu"]
    argv += "--input-size 64 --epochs 1 --warmup-epochs 0 --batch-size 2 --demo-images 4".split()
    argv += ["--num-workers", "0", "--recon-every", "1"]
    assert main([*argv, "--seed", str(2**63 - 1)]) == 0
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-0001.pth").is_file()
    capsys.readouterr()
    assert "seed must lie in [0, 2**63)" in refusal(capsys, [*argv, "--seed", str(2**63)])


@MEMORY_KNOWN
@pytest.mark.parametrize(
    "argv, says",
    [
        (["pretrain", "--decoder-dim", "1000000000"], "--decoder-dim 1000000000 and"),
        (["pretrain", "--decoder-depth", "100000000000"], "--decoder-depth 100000000000 need"),
        (["pretrain", "--input-size", "1000000000"], "--input-size 1000000000 need"),
        (["pretrain", "--batch-size", str(10**15)], f"--batch-size {10**15} and"),
        (["pretrain", "--demo-images", str(10**15)], f"--demo-images {10**15} needs"),
        (["sweep", "--eval-batch-size", str(10**15)], f"--eval-batch-size {10**15} and"),
        (["finetune", "--input-size", "1000000000"], "--input-size 1000000000 need"),
        (["linprobe", "--input-size", "1000000000"], "--input-size 1000000000 need"),
        (["linprobe", "--num-classes", str(10**15)], f"--num-classes {10**15} needs"),
        (["knn", "--input-size", "1000000000"], "--input-size 1000000000 need"),
        (["eval", "--input-size", "1000000000"], "--input-size 1000000000 need"),
        (["eval", "--batch-size", str(10**15)], f"--batch-size {10**15} and"),
        (["eval", "--crop-pct", "1e-9"], "raise --crop-pct"),
        (["visualize", "--input-size", "1000000000"], "--input-size 1000000000 needs"),
    ],
)
def test_a_run_that_cannot_fit_in_memory_is_refused_with_the_estimate(capsys, argv, says):
    err = refusal(capsys, argv)
    assert says in err and " bytes (" in err and "GiB of memory; " in err


@MEMORY_KNOWN
def test_the_estimate_counts_on_the_cpu_what_a_gpu_would_hold():
    """On the host: 4 bytes a parameter as built; with --device cpu also gradients and AdamW."""
    flags = {"data": "X", "decoder_dim": 4096, "decoder_depth": 8}
    auto, cpu = (resolve(PretrainConfig, None, {**flags, "device": d}) for d in ("auto", "cpu"))
    assert budget.pretraining(cpu)[1].bytes == 4 * budget.pretraining(auto)[1].bytes
    assert budget.pretraining(cpu)[2].bytes > budget.pretraining(auto)[2].bytes  # activations


@pytest.mark.parametrize("model", ["convnextv2_atto", "convnextv2_nano"])
def test_the_parameter_estimate_is_a_close_lower_bound(model):
    """A refusal must never hit a run that would fit: the estimate counts no more than the
    network holds."""
    cfg = resolve(PretrainConfig, None, {"model": model, "data": "X", "decoder_depth": 2})
    encoder, decoder = (need.bytes / 4 for need in budget.pretraining(cfg)[:2])
    network = fcmae.create_model(f"fcmae_{model}", decoder_depth=2)
    counts = {"encoder": 0, "decoder": 0}
    for name, p in network.named_parameters():
        counts["encoder" if name.startswith("encoder.") else "decoder"] += p.numel()
    assert 0.95 * counts["encoder"] < encoder <= counts["encoder"]
    assert 0.95 * counts["decoder"] < decoder <= counts["decoder"]
