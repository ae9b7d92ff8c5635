"""Reading checkpoints safely: safetensors files only, every key and shape checked by name.

A loader maps the checkpoint's names to the attnkit module's parameter names (``rename``), then
``load_checked`` copies tensors in, refusing with an error that names the key and both shapes when
anything is missing, left over or the wrong shape. Nothing here can unpickle anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint does not fit the model built from its config (missing / extra key, wrong shape)."""


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"expected {path.name} in {path.parent} (a Hugging Face style model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a .safetensors file (CPU). Pickle formats (.bin, .pt) are refused."""
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path.name}: attnkit loads only .safetensors weights, never pickled "
                              f"files (.bin/.pt); convert with safetensors.torch.save_file")
    if not path.is_file():
        raise FileNotFoundError(f"expected weights at {path}")
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading checkpoints needs the safetensors package: pip install safetensors") from e
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (not a ValueError) on a bad file
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}); re-download or re-convert it") from e


def config_value(config: Mapping, key: str, kind: type = int):
    """config[key], checked for presence and type, with an error naming the key."""
    if key not in config:
        raise CheckpointError(f"config is missing {key!r}; keys present: {sorted(config)[:20]}")
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"config[{key!r}] = {value!r}; expected {kind.__name__}")
    return value


def load_checked(module: nn.Module, state: Mapping[str, Tensor], rename: Callable[[str], str | None], *,
                 assign: bool = False, copy: bool = True) -> None:
    """Copy ``state`` into ``module``'s parameters and buffers after renaming each key.

    ``rename(key)`` gives the module's name for a checkpoint key, or None to skip it on purpose
    (e.g. a pooler the model does not use). Raises ``CheckpointError`` naming the keys and shapes
    if any target is missing, unknown, or has the wrong shape.

    ``assign=True`` replaces the parameters by the checkpoint's tensors instead of copying into
    them, for a module built on the meta device; ``copy=False`` then shares their storage (for
    tensors the loader read itself, never for a caller's state dict).
    """
    targets = dict(module.named_parameters())
    targets.update({k: v for k, v in module.named_buffers() if k in module.state_dict()})
    mapped: dict[str, tuple[str, Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        name = rename(key)
        if name is None:
            continue
        if name not in targets:
            unknown.append(key)
            continue
        if targets[name].is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(f"checkpoint key {key!r} holds {tensor.dtype} values but {name!r} is a float "
                                  f"parameter {tuple(targets[name].shape)}; the file is corrupt or not this model's")
        if tuple(tensor.shape) != tuple(targets[name].shape):
            raise CheckpointError(f"checkpoint key {key!r} has shape {tuple(tensor.shape)} but the model built "
                                  f"from the config expects {tuple(targets[name].shape)} for {name!r}; "
                                  "the weights and config.json do not belong together")
        mapped[name] = (key, tensor)
    if unknown:
        raise CheckpointError(f"checkpoint keys the model has no place for: {unknown[:8]}"
                              f"{' ...' if len(unknown) > 8 else ''}; is this the right architecture?")
    missing = [name for name in targets if name not in mapped]
    if missing:
        raise CheckpointError(f"checkpoint is missing weights for {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                              f"({len(missing)} in all)")
    if assign:
        _assign(module, {name: tensor for name, (_, tensor) in mapped.items()}, copy)
        return
    with torch.no_grad():
        for name, (_, tensor) in mapped.items():
            targets[name].copy_(tensor.to(targets[name].dtype))


def _assign(module: nn.Module, values: dict[str, Tensor], copy: bool) -> None:
    """Make the checkpoint's tensors the module's parameters (a module built on the meta device
    gets real storage without a random init or a second copy); tied aliases share one."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for full, p in module.named_parameters(remove_duplicate=False):
        owner, _, attr = full.rpartition(".")
        owners.setdefault(id(p), []).append((module.get_submodule(owner), attr))
    params = dict(module.named_parameters())
    for name, tensor in values.items():
        if name not in params:  # a persistent buffer
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._buffers[attr] = tensor.to(module.get_buffer(name).dtype, copy=copy)
            continue
        old = params[name]
        new = nn.Parameter(tensor.to(old.dtype, copy=copy), requires_grad=old.requires_grad)
        for owner_module, attr in owners[id(old)]:
            owner_module._parameters[attr] = new
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal: no checkpoint tensor reached {left[:4]}; they are still on the meta device")
