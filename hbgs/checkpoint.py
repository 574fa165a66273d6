"""One file format for every model hbgs saves: trained baselines and pruned models alike.

A file is a ``torch.save`` of a dict::

    {"format": "hbgs-model/1",
     "model_cfg": {"_target_": "hbgs.models.resnet20", "num_classes": 10},   # or None
     "structure": {"layer1.0.conv1": <AdaptedConv.spec()>, ...},             # pruned layers
     "state_dict": {...},
     "meta": {...}}                                                          # plain data

Loading instantiates ``model_cfg`` with Hydra, swaps in an ``AdaptedConv`` of the recorded
shapes at every name in ``structure``, and loads the weights strictly, so a pruned model loads
with no knowledge of how it was pruned (a pruned ``state_dict`` alone would not fit the
original class).

Models without a ``model_cfg`` (a user's own class, built without Hydra) are stored as a pickled
module instead. That always round-trips, but unpickling imports the model's class by name and
runs arbitrary code, so such files need the same code importable at load time and must only
be loaded from trusted sources. The outer file is always readable with ``weights_only=True``:
``load_meta`` never unpickles a module.
"""
from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from hbgs.errors import HbgsError
from hbgs.pruning.adapters import AdaptedConv

FORMAT = "hbgs-model/1"
_HOW_TO_GET_ONE = "train one with `python -m hbgs.run stage=train model=<name>`"


class CheckpointError(HbgsError, ValueError):
    """A file that is not an hbgs model file, or whose weights do not fit its architecture."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No file at the given path."""


def save_model(model: nn.Module, path: str | os.PathLike, *, model_cfg: Mapping | None = None,
               meta: Mapping | None = None) -> Path:
    """Write ``model`` to ``path`` atomically (temp file, then ``os.replace``); return the path.

    ``model_cfg`` is a Hydra-instantiable dict that builds the ORIGINAL (unpruned) architecture;
    pruned layers (``AdaptedConv``) are recorded separately. Without it the module is pickled
    (see the module docstring for the trade-off). ``meta`` must be plain data (dicts, lists,
    strings, numbers, tensors); OmegaConf containers are converted.
    """
    model_cfg = _plain(model_cfg, "model_cfg")
    payload = {"format": FORMAT, "model_cfg": model_cfg, "structure": adapted_structure(model),
               "state_dict": None, "meta": _plain(meta, "meta")}
    if model_cfg is None:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        payload["module"] = buffer.getvalue()
    else:
        payload["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a model file is an ordinary file
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path``, in eval mode, on ``map_location``."""
    payload = _read(path, map_location)
    if payload["model_cfg"] is None:
        model = torch.load(io.BytesIO(payload["module"]), map_location=map_location,
                           weights_only=False)
    else:
        model = _build(payload["model_cfg"], payload["structure"], path)
        _load_weights(model, payload["state_dict"], path)
        model.to(map_location)
    return model.eval()


def load_meta(path: str | os.PathLike) -> dict | None:
    """The ``meta`` dict saved with the model, without building the model."""
    return _read(path, "cpu")["meta"]


def load_model_cfg(path: str | os.PathLike) -> dict | None:
    """The Hydra config that builds the original (unpruned) architecture, or None for a pickled module."""
    return _read(path, "cpu")["model_cfg"]


def adapted_structure(model: nn.Module) -> dict[str, dict]:
    """``{qualified name: AdaptedConv.spec()}`` for every ``AdaptedConv`` in ``model``."""
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, AdaptedConv)}


def _read(path, map_location) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFound(f"no model file at {path}; {_HOW_TO_GET_ONE}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not an hbgs model file (format {FORMAT!r}): "
                              f"torch.load failed with {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from err
    found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if found != FORMAT:
        raise CheckpointError(f"{path} is not an hbgs model file: expected format {FORMAT!r}, "
                              f"found {found!r}; {_HOW_TO_GET_ONE}")
    return payload


def _build(model_cfg: dict, structure: dict, path) -> nn.Module:
    from hydra.utils import instantiate  # imported here: only this path needs Hydra

    try:
        model = instantiate(model_cfg)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot build model_cfg {model_cfg}: {err}") from err
    for name, spec in structure.items():
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise CheckpointError(f"{path}: the file has a pruned layer {name!r} but the model "
                                  f"built from {model_cfg} has no such module") from err
        model.set_submodule(name, AdaptedConv.from_spec(spec))
    return model


def _load_weights(model: nn.Module, state_dict: dict, path) -> None:
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong_shape = [f"{k}: file {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
                   for k in expected.keys() & state_dict.keys()
                   if state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problems = [(label, items) for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches", sorted(wrong_shape))) if items]
        detail = "; ".join(f"{label} ({len(items)}): {', '.join(items[:8])}"
                           + (", ..." if len(items) > 8 else "") for label, items in problems)
        raise CheckpointError(f"{path}: the weights do not match the architecture: {detail}")
    model.load_state_dict(state_dict, strict=True)


def _plain(value, where: str):
    """``value`` as plain data that ``torch.load(weights_only=True)`` accepts, or a TypeError."""
    if value is None or isinstance(value, (str, int, float, bool, torch.Tensor)):
        return value
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return _plain(OmegaConf.to_container(value, resolve=True), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"{where} has type {type(value).__name__}; save only plain data "
                    "(dict, list, str, int, float, bool, None, tensors)")
