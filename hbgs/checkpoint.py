"""One file format for every model hbgs saves: trained baselines and pruned models alike.

A file is a ``torch.save`` of a dict::

    {"format": "hbgs-model/2",
     "model_cfg": {"_target_": "hbgs.models.resnet20", "num_classes": 10},   # or None
     "structure": {"layer1.0.conv1": <AdaptedConv.spec()>,                  # what differs from
                   "layer1.0.bn1": {"kind": "BatchNorm2d", "args": {...}},   # model_cfg's model
                   ...},
     "state_dict": {...},
     "meta": {...},                                                          # plain data
     "memory_format": "channels_last"}                                       # optional

``structure`` maps a module name to the module to put there instead of the one ``model_cfg``
builds. Two forms of entry:

* an ``AdaptedConv`` (a layer pruned with adapters): its ``spec()``, the dict with keys
  ``conv`` / ``in_adapter`` / ``out_adapter`` (the only form of the first files);
* a plain leaf whose type or shape differs from the built model's (structural surgery, an
  exported model's folded BatchNorms and merged convs): ``{"kind": K, "args": {...}}`` with K one
  of ``Conv2d``, ``BatchNorm2d``, ``Linear``, ``Identity`` and ``args`` its constructor
  arguments (``LEAF_KINDS``).

``save_model`` finds these by building ``model_cfg`` (on the meta device: no memory, no
initialisation cost) and comparing module types and constructor arguments name by name, so
only the changed modules are recorded and the file stays the size of the weights. A changed
module of any other type cannot be recorded: saving says so (save it pickled, without
``model_cfg``). ``memory_format`` is present when the model's conv weights are channels-last (an
exported model that measured faster that way); loading converts the model back to it.

Loading instantiates ``model_cfg`` with Hydra, puts the recorded module at every name in
``structure``, and loads the weights strictly (every key and shape must match), so a pruned
model loads with no knowledge of how it was pruned (a pruned ``state_dict`` alone would not fit
the original class).

Models without a ``model_cfg`` (a user's own class, built without Hydra) are stored as a pickled
module instead. That always round-trips, but unpickling imports the model's class by name and
runs arbitrary code, so such files need the same code importable at load time and must only
be loaded from trusted sources. The outer file is always readable with ``weights_only=True``:
``load_meta`` never unpickles a module.
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from hbgs.atomic import atomic_file
from hbgs.errors import HbgsError
from hbgs.pruning.adapters import AdaptedConv

FORMAT = "hbgs-model/2"  # 2: tagged leaf entries in ``structure``, ``memory_format``
READABLE_FORMATS = ("hbgs-model/1", FORMAT)  # a /1 file is a /2 file without those
_HOW_TO_GET_ONE = "train one with `python -m hbgs.run stage=train model=<name>`"


class CheckpointError(HbgsError, ValueError):
    """A file that is not an hbgs model file, or whose weights do not fit its architecture."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No file at the given path."""


def save_model(model: nn.Module, path: str | os.PathLike, *, model_cfg: Mapping | None = None,
               meta: Mapping | None = None, half: bool = False) -> Path:
    """Write ``model`` to ``path`` atomically (temp file, then ``os.replace``); return the path.

    ``model_cfg`` is a Hydra-instantiable dict that builds the ORIGINAL (unpruned) architecture;
    pruned layers (``AdaptedConv``) are recorded separately. Without it the module is pickled
    (see the module docstring for the trade-off). ``meta`` must be plain data (dicts, lists,
    strings, numbers, tensors); OmegaConf containers are converted. ``half`` stores floating
    weights as float16 (half the file; the zoo's VGG-16 uses it): loading casts them back into the
    float32 model, so what loads is the float16-rounded network.
    """
    model_cfg = _plain(model_cfg, "model_cfg")
    payload = {"format": FORMAT, "model_cfg": model_cfg, "structure": adapted_structure(model),
               "state_dict": None, "meta": _plain(meta, "meta")}
    if model_cfg is None:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        payload["module"] = buffer.getvalue()
    else:
        payload["structure"] = changed_structure(model, model_cfg)
        payload["state_dict"] = {k: _stored(v, half) for k, v in model.state_dict().items()}
        if is_channels_last(model):
            payload["memory_format"] = "channels_last"
    path = Path(path)
    with atomic_file(path) as f:
        torch.save(payload, f)
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
        if payload.get("memory_format") == "channels_last":
            model.to(memory_format=torch.channels_last)
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


# -- plain leaves whose shape or type changed ----------------------------------------------------

def _conv2d_args(m: nn.Conv2d) -> dict:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": tuple(m.kernel_size), "stride": tuple(m.stride),
            "padding": m.padding if isinstance(m.padding, str) else tuple(m.padding),
            "dilation": tuple(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "padding_mode": m.padding_mode}


def _batchnorm2d_args(m: nn.BatchNorm2d) -> dict:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
            "affine": m.affine, "track_running_stats": m.track_running_stats}


def _linear_args(m: nn.Linear) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None}


# kind → (class, constructor arguments of an instance); the classes are matched exactly, so a
# subclass (a parametrized conv, a user's own layer) is never mistaken for its base.
LEAF_KINDS: dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict]]] = {
    "Conv2d": (nn.Conv2d, _conv2d_args),
    "BatchNorm2d": (nn.BatchNorm2d, _batchnorm2d_args),
    "Linear": (nn.Linear, _linear_args),
    "Identity": (nn.Identity, lambda m: {}),
}
_KIND_OF = {cls: kind for kind, (cls, _) in LEAF_KINDS.items()}


def leaf_spec(module: nn.Module) -> dict | None:
    """``{"kind": K, "args": {...}}`` for a module of a recordable leaf type, else None."""
    kind = _KIND_OF.get(type(module))
    return None if kind is None else {"kind": kind, "args": LEAF_KINDS[kind][1](module)}


def module_from_spec(spec: dict) -> nn.Module:
    """The module a ``structure`` entry describes (either form), weights to be loaded."""
    if "kind" not in spec:
        return AdaptedConv.from_spec(spec)
    if spec["kind"] not in LEAF_KINDS:
        raise CheckpointError(f"unknown module kind {spec['kind']!r} in the file's structure; "
                              f"this version reads {', '.join(LEAF_KINDS)} and AdaptedConv")
    return LEAF_KINDS[spec["kind"]][0](**spec["args"])


def changed_structure(model: nn.Module, model_cfg: Mapping) -> dict[str, dict]:
    """The ``structure`` of ``model`` against the model ``model_cfg`` builds: every
    ``AdaptedConv``, and every ``Conv2d`` / ``BatchNorm2d`` / ``Linear`` / ``Identity`` whose type
    or constructor arguments differ from the module of the same name there. A module with no
    namesake is not recorded (its weights make loading fail with the unexpected keys named).
    CheckpointError when a module of another type differs in type."""
    reference = dict(_instantiate_cheaply(model_cfg).named_modules())
    structure, replaced = {}, []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in replaced):
            continue  # the root, or inside a module already recorded whole
        old = reference.get(name)
        if isinstance(module, AdaptedConv):
            structure[name] = module.spec()
        elif type(module) in _KIND_OF:
            spec = leaf_spec(module)
            if old is not None and leaf_spec(old) != spec:
                structure[name] = spec
        elif old is not None and type(old) is not type(module):
            raise CheckpointError(
                f"cannot record the {type(module).__name__} at {name!r} (the model built from "
                f"{dict(model_cfg)} has a {type(old).__name__} there): the file records changed "
                f"modules of the kinds {', '.join(LEAF_KINDS)} and AdaptedConv only; save this "
                "model without model_cfg to pickle the module instead")
        else:
            continue
        if name in structure:
            replaced.append(name)
    return structure


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-D weights are laid out channels-last (and not also contiguous,
    which a 1×1 weight is in both layouts)."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    telling = [p for p in weights if p.is_contiguous() != p.is_contiguous(memory_format=torch.channels_last)]
    return bool(telling) and all(p.is_contiguous(memory_format=torch.channels_last) for p in telling)


def _instantiate_cheaply(model_cfg: Mapping) -> nn.Module:
    """``model_cfg``'s model with its tensors on the meta device (no memory, no real init); on
    the CPU for a builder that does not work there."""
    from hydra.utils import instantiate

    try:
        with torch.device("meta"):
            return instantiate(dict(model_cfg))
    except Exception:
        try:
            return instantiate(dict(model_cfg))
        except Exception as err:
            raise CheckpointError(f"cannot build model_cfg {dict(model_cfg)}: {err}; pass the "
                                  "Hydra config of the model's original architecture") from err


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
    if found not in READABLE_FORMATS:
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
        model.set_submodule(name, module_from_spec(spec))
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


def _stored(tensor: torch.Tensor, half: bool) -> torch.Tensor:
    tensor = tensor.detach().cpu().contiguous()
    return tensor.half() if half and tensor.is_floating_point() else tensor


def _plain(value, where: str):
    """``value`` as plain data that ``torch.load(weights_only=True)`` accepts, or a TypeError."""
    if isinstance(value, str):
        return str(value)  # a subclass such as torch.__version__'s would not load weights-only
    if value is None or isinstance(value, (int, float, bool, torch.Tensor)):
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
