"""save / load of dynamic models: a directory with `config.json` + `model.safetensors`.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place,
so an interrupted save never leaves a half-written model. A model is saveable when it has a
dataclass `config` and its class is registered with `register_architecture`; the current policy
(thresholds included) is saved with it. Optional hooks: `model.save_extra_files(tmp_dir)` writes
more files into the directory being saved; `cls.from_saved_directory(config, directory)` builds
the (weight-less) model on load when it needs those files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dynets.core.config import config_from_dict, config_to_dict

FORMAT_VERSION = 1
_ARCHITECTURES: dict[str, type[nn.Module]] = {}


def register_architecture(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: `cls(config)` can rebuild the model from its saved config."""
    _ARCHITECTURES[cls.__name__] = cls
    return cls


def _atomic_dir_write(target: Path, write: Any) -> None:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model: nn.Module, directory: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Save `model` to `directory` (config.json + model.safetensors), atomically."""
    arch = type(model).__name__
    if arch not in _ARCHITECTURES or not hasattr(model, "config"):
        raise TypeError(
            f"cannot save a {arch}: expected a registered architecture with a dataclass `config` "
            f"(known: {sorted(_ARCHITECTURES)}); for your own modules save model.state_dict()"
        )
    if getattr(model, "inference_only", False):
        raise TypeError(
            "cannot save a model made by optimize_for_inference (its BatchNorm is folded away); "
            "save the original model instead"
        )
    policy = getattr(model, "policy", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "config": config_to_dict(model.config),
        "policy": policy.to_dict() if policy is not None else None,
        "extra": extra or {},
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model, "save_extra_files"):  # e.g. a tokenizer, written inside the same atomic dir
            model.save_extra_files(tmp)

    _atomic_dir_write(Path(directory), write)
    return Path(directory)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a saved model, with clear errors for missing or broken files."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise FileNotFoundError(
            f"model directory {str(directory)!r} does not exist (expected a folder "
            f"with config.json and model.safetensors)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected a dynets model directory")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt or truncated") from e
    for key in ("architecture", "config"):
        if key not in meta:
            raise ValueError(f"{path} has no {key!r} entry; expected a config written by dynets.save")
    return meta


def load(directory: str | os.PathLike, *, map_location: str = "cpu") -> nn.Module:
    """Rebuild a saved model (architecture, weights and policy); it gives identical outputs."""
    from dynets.policies import policy_from_dict  # late import: policies depend on core

    meta = read_config(directory)
    arch = meta["architecture"]
    import dynets.models  # noqa: F401  (registers the zoo's architectures)
    import dynets.text  # noqa: F401  (DynamicBert; transformers itself is imported only when used)

    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {arch!r} in {directory}; expected one of {sorted(_ARCHITECTURES)}"
        )
    cls = _ARCHITECTURES[arch]
    config = config_from_dict(cls.config_class, meta["config"])  # type: ignore[attr-defined]
    # A class may rebuild itself from the directory (e.g. to read a tokenizer saved beside the weights).
    model = (
        cls.from_saved_directory(config, Path(directory))
        if hasattr(cls, "from_saved_directory")
        else cls(config)
    )
    weights = Path(directory) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: expected the model weights beside config.json")
    try:
        state = load_file(str(weights), device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{weights} could not be read ({e}); the checkpoint is corrupt or truncated") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match architecture {arch}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if meta.get("policy") is not None and hasattr(model, "policy"):
        model.policy = policy_from_dict(meta["policy"])
    model.eval()
    return model


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file via a temporary sibling and rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary sibling file and an atomic rename."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
