"""Weights on the Hugging Face Hub by name: which sources are Hub names, and the one download.

timm publishes its ConvNeXt V2 releases as Hub repositories (``timm/convnextv2_tiny.fcmae``);
``hub_file`` fetches such a repository's weights file through huggingface_hub's cache, and
``fcmae.weights.layouts.read_weights`` reads it like any other checkpoint file. Importing it
loads no torch (timm, for its list of releases, is imported when a name is checked).

    repo = hub_name("timm/convnextv2_tiny.fcmae")   # None for a path
    path = hub_file(repo)                           # cached, else downloaded
"""

from __future__ import annotations

import re
from pathlib import Path

from fcmae.errors import UserError

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
