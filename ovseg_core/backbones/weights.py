"""Weight files: official names, lookup, opt-in download, safe reading, key conversion, checking.

Reading never unpickles arbitrary code: ``torch.load(weights_only=True)`` for pickled
checkpoints, ``safetensors`` for ``.safetensors`` files, and ``torch.jit.load(...).state_dict()``
for OpenAI's original TorchScript archives (TorchScript is interpreted, no Python pickles run).

The file identity is cheap on purpose: hashing a multi-GB checkpoint on every load is too slow,
so :func:`file_fingerprint` is the sha256 of the file size plus its first and last MiB (the whole
file when it is at most 2 MiB). It tells apart different releases and truncated downloads, not
a deliberately crafted file.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.convert import convert_state_dict
from open_clip.model import convert_to_custom_text_state_dict
from open_clip.pretrained import download_pretrained
from torch import nn

from .spec import DINO_ARCHS, SAM2_ARCHS, SAM_ARCHS, BackboneSpec
from .vfm_archs import vfm_arch
from .vfm_weights import convert_vfm_keys, load_vfm_buffers

__all__ = [
    "DOWNLOAD_PROBE_TIMEOUT_S",
    "FINGERPRINT_SCOPE",
    "WEIGHTS_ENV",
    "convert_keys",
    "file_fingerprint",
    "is_torchscript_archive",
    "load_into",
    "official_file",
    "read_state_dict",
    "resolve_weight_file",
]

log = logging.getLogger(__name__)

# Environment variable naming the default weights directory.
WEIGHTS_ENV = "OVSEG_WEIGHTS"
# Seconds a download may wait for the server before failing (closed networks fail at once).
DOWNLOAD_PROBE_TIMEOUT_S = 10.0
# What file_fingerprint hashes, recorded next to it in identities.
FINGERPRINT_SCOPE = "sha256(size, first MiB, last MiB)"
_MIB = 1 << 20
# OpenAI TorchScript archives carry these non-weight entries in their state dict.
_OPENAI_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{stem}/{stem}.pth"
_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/{file}"
# SAM 2 (July 2024) and SAM 2.1 (September 2024) release folders.
_SAM2_URL = {"2": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/{file}",
             "2.1": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/{file}"}
_HF_URL = "https://huggingface.co/{model_id}/resolve/main/{file}"
_MAX_LISTED_KEYS = 5
# Containers of a checkpoint's tensors, first found wins (NVlabs/RADIO: the EMA weights if stored;
# "weights": the other container PE's own loader accepts).
_CONTAINERS = ("state_dict_ema", "state_dict", "teacher", "model", "weights")
# Non-tensor objects some official checkpoints pickle next to the tensors, allowed by the safe loader
# (NVlabs/RADIO torch.hub files store their training arguments as an argparse.Namespace).
_SAFE_GLOBALS = (argparse.Namespace,)


def official_file(spec: BackboneSpec) -> tuple[str, str]:
    """(file name relative to the weights directory, download URL) of a pretrained spec.

    CLIP file names come from open_clip's pretrained registry: the base name of the tag's URL,
    or ``<hub repo name>/<file>`` for tags only published on the Hugging Face hub.

    Raises:
        ValueError: for random weights, local files and tiny configurations (no official file).
    """
    if spec.is_random or spec.is_local_file or spec.is_tiny:
        raise ValueError(f"{spec.name} has no official weight file (random, tiny or local-file weights)")
    if spec.family == "dino":
        stem = DINO_ARCHS[spec.arch][1]
        return f"{stem}.pth", _DINO_URL.format(stem=stem)
    if spec.family == "sam":
        return SAM_ARCHS[spec.arch], _SAM_URL.format(file=SAM_ARCHS[spec.arch])
    if spec.family == "sam2":
        file = SAM2_ARCHS[spec.arch][1 if spec.sam2_release == "2.1" else 0]
        return file, _SAM2_URL[spec.sam2_release].format(file=file)
    if spec.family == "vfm":
        arch = vfm_arch(spec.arch)
        return str(arch.file), str(arch.url)
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.weights)
    if cfg.get("url"):
        return os.path.basename(cfg["url"]), cfg["url"]
    model_id, file = os.path.split(cfg["hf_hub"])
    file = file or HF_WEIGHTS_NAME
    return f"{os.path.basename(model_id)}/{file}", _HF_URL.format(model_id=model_id, file=file)


def _candidates(file_name: str) -> list[str]:
    """The official name and its safetensors alternative (as open_clip's hub download prefers)."""
    names = [file_name]
    head, base = os.path.split(file_name)
    if base == HF_WEIGHTS_NAME:
        names.append(os.path.join(head, HF_SAFE_WEIGHTS_NAME))
    return names


def _probe(url: str, timeout: float) -> None:
    """Fail fast with ConnectionError when ``url`` cannot be reached."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"cannot reach {url}: {e}") from e


def _download(spec: BackboneSpec, file_name: str, url: str, directory: Path) -> Path:
    _probe(url, DOWNLOAD_PROBE_TIMEOUT_S)
    directory.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s for %s into %s", url, spec.name, directory)
    if spec.family == "clip":
        # open_clip's own downloader (checks the sha256 embedded in OpenAI/LAION URLs).
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.weights)
        return Path(download_pretrained(cfg, prefer_hf_hub=False, cache_dir=str(directory)))
    target = directory / file_name
    torch.hub.download_url_to_file(url, str(target), progress=False)
    return target


def resolve_weight_file(
    spec: BackboneSpec,
    *,
    weights: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> Path | None:
    """The checkpoint file of ``spec``; None for random weights.

    Order: the explicit ``weights`` file; a local path in the name; the official file name in
    ``weights_dir`` (default: the ``OVSEG_WEIGHTS`` environment variable); a download into that
    directory when ``allow_download``.

    Raises:
        ValueError: ``weights`` given for random or local-path specs; download without a directory.
        FileNotFoundError: the file is missing (names the file, the directory and the URL).
        ConnectionError: ``allow_download`` and the server cannot be reached.
    """
    if spec.is_random:
        if weights is not None:
            raise ValueError(f"{spec.name} has random weights; drop weights={os.fspath(weights)!r} or name a tag")
        return None
    if spec.is_local_file or weights is not None:
        if spec.is_local_file and weights is not None:
            raise ValueError(
                f"{spec.name} already names a checkpoint file; drop weights={os.fspath(weights)!r}"
            )
        path = Path(os.fspath(weights if weights is not None else spec.weights)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {str(path)!r} for {spec.family}:{spec.arch} does not exist")
        return path
    file_name, url = official_file(spec)
    directory = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_ENV) or None
    if directory is not None:
        directory = Path(os.fspath(directory)).expanduser()
        for name in _candidates(file_name):
            if (directory / name).is_file():
                return directory / name
    if allow_download:
        if directory is None:
            raise ValueError(f"allow_download needs a target directory: pass weights_dir= or set {WEIGHTS_ENV}")
        try:
            return _download(spec, file_name, url, directory)
        except ConnectionError as e:
            raise ConnectionError(
                f"downloading {file_name!r} for {spec.name} failed ({e}); the network may be closed: "
                f"download {url} by hand into {directory}"
            ) from e
    if directory is None:
        raise FileNotFoundError(
            f"weights of {spec.name}: file {file_name!r} not found because no weights directory is set "
            f"(weights_dir=None and {WEIGHTS_ENV} unset). Download it from {url} into a directory and pass "
            f"weights_dir= or set {WEIGHTS_ENV}, or name a local file with @/path or weights="
        )
    raise FileNotFoundError(
        f"weights of {spec.name}: file {file_name!r} not found in weights directory {str(directory)!r}. "
        f"Download it from {url} into that directory (or pass allow_download=True), "
        "or name a local file with @/path or weights="
    )


def file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap content hash: sha256 of the size and the first and last MiB (see module docstring)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= 2 * _MIB:
            h.update(f.read())
        else:
            h.update(f.read(_MIB))
            f.seek(size - _MIB)
            h.update(f.read(_MIB))
    return h.hexdigest()


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip archive (OpenAI's original CLIP ``.pt`` files)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _corrupt(path: Path, e: BaseException) -> ValueError:
    detail = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e).lower():
        why = "it holds pickled Python objects besides tensors, which are refused (weights_only=True)"
    else:
        why = "the file may be corrupted or truncated; download it again"
    return ValueError(f"cannot read checkpoint {str(path)!r}: {type(e).__name__}: {detail[:200]} ({why})")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict on the CPU, safely.

    Unwraps the usual containers: ``{"state_dict": ...}`` (open_clip / MetaCLIP training
    checkpoints), ``{"teacher": ...}`` (DINO full checkpoints), ``{"state_dict_ema": ...}`` (NVlabs/RADIO
    torch.hub files, whose ``args`` entry is an ``argparse.Namespace``, the one non-tensor class
    the safe loader accepts), ``{"weights": ...}`` (accepted by PE's loader), a ``module.`` prefix.

    Raises:
        ValueError: unreadable, corrupted, not a state dict, or holding non-tensor pickles.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        elif is_torchscript_archive(path):
            with warnings.catch_warnings():
                # torch.jit is deprecated for new code, but these files are TorchScript archives.
                warnings.simplefilter("ignore", FutureWarning)
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            # mmap keeps multi-GB zip-format checkpoints out of memory until copied into the model.
            with torch.serialization.safe_globals(list(_SAFE_GLOBALS)):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - every reader failure means an unusable file
        raise _corrupt(path, e) from e
    for container in _CONTAINERS:
        if isinstance(obj, dict) and isinstance(obj.get(container), dict):
            obj = obj[container]
            break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state dict (got {type(obj).__name__})")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def convert_keys(model: nn.Module, spec: BackboneSpec, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a checkpoint's keys onto the model's, as the libraries' own loaders do.

    CLIP: drop OpenAI TorchScript extras, open_clip's ``convert_state_dict`` and custom-text
    conversion, scalar/1-d ``logit_scale``. DINO: the ``backbone.`` prefix and the projection
    ``head.`` of full training checkpoints. SAM and SAM 2: keys are used as they are (SAM 2
    files wrap them in ``{"model": ...}``, unwrapped by :func:`read_state_dict`). VFM: timm's own
    filters (:func:`~ovseg_core.backbones.vfm_weights.convert_vfm_keys`).
    """
    sd = dict(state_dict)
    if spec.family == "clip":
        for key in _OPENAI_JIT_EXTRA_KEYS:
            sd.pop(key, None)
        sd = convert_state_dict(model, sd)
        if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
            sd = convert_to_custom_text_state_dict(sd)
        scale = sd.get("logit_scale")
        if isinstance(scale, torch.Tensor) and scale.ndim != model.logit_scale.ndim:
            sd["logit_scale"] = scale.reshape(model.logit_scale.shape)
    elif spec.family == "dino" and any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    elif spec.family == "vfm":
        sd = convert_vfm_keys(model, vfm_arch(spec.arch).kind, sd)
    return sd


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else ""
    return ", ".join(keys[:_MAX_LISTED_KEYS]) + more


def load_into(model: nn.Module, spec: BackboneSpec, path: str | os.PathLike) -> None:
    """Read ``path``, convert its keys and load it strictly into ``model``.

    Raises:
        ValueError: unreadable file, or a checkpoint of another architecture (names the file and
            the first missing / unexpected / mismatched keys).
    """
    path = Path(path)
    raw = read_state_dict(path)
    try:
        sd = convert_keys(model, spec, raw)
    except (KeyError, RuntimeError) as e:  # a converter meeting a checkpoint of another layout
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {spec.family}:{spec.arch} (wrong architecture?); "
            f"its keys cannot be converted: {type(e).__name__}: {e}"
        ) from e
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    not_tensor = [k for k in sd if k in expected and not isinstance(sd[k], torch.Tensor)]
    mismatched = [
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].shape != expected[k].shape
    ]
    problems = [
        f"{label}: {_listed(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("non-tensor values", not_tensor),
            ("shape mismatch", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {spec.family}:{spec.arch} (wrong architecture?); "
            + "; ".join(problems)
        )
    model.load_state_dict(sd, strict=True)
    if spec.family == "vfm":
        load_vfm_buffers(model, vfm_arch(spec.arch).kind, raw)
