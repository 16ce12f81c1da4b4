"""Teachers from a Python factory: ``factory:MODULE:FUNCTION`` names a function that builds any network and its
schedule, for teachers that are neither distill's own nor diffusers directories.

The function takes no arguments and returns a :class:`FactoryModel` (or a ``(net, schedule)`` pair, with the
defaults below and ``net.config``'s ``image_size``, ``in_channels`` and ``num_classes``). ``net(x, time_input,
labels)`` predicts ``prediction`` with time given as ``time_input`` (see :data:`distill.denoiser.TIME_INPUTS`);
``schedule`` is a :class:`~distill.schedules.Schedule` or its config dict (``{"name": "cosine", ...}``).

The spec is taken anywhere a model is (``distill sample|eval|progressive|consistency|export factory:pkg.mod:make``, a
recipe's ``teacher:``). The model is converted once into a model file under ``$DISTILL_CACHE/factory`` (named by the
spec and a hash of the weights the factory returns) whose architecture is ``factory``: loading it, or any student
distilled from it, calls the factory again to build the network (then loads the file's weights).

This is code execution, so it is explicit: a factory runs only when the command line or the recipe names it (the
CLI and the recipe loader call :func:`name_factory`; a Python caller does the same), or when its module is listed in
``DISTILL_TRUSTED_FACTORIES`` (comma-separated module names; for a factory model's students used by later commands).
A model file, a manifest or any other file never runs code by itself. The module is imported from ``sys.path``, with
the working directory searched last.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill.errors import UsageError

ARCH = "factory"
PREFIX = "factory:"
TRUST_ENV = "DISTILL_TRUSTED_FACTORIES"
_NAMED: set[str] = set()  # modules whose factory this process was asked to run


@dataclass
class FactoryModel:
    """What a factory returns: the network, its schedule and how to read it."""

    net: nn.Module
    schedule: Any
    prediction: str = "eps"
    time_input: str = "t1000"
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) [net.config's]
    num_classes: int = 0  # class labels; with null_label, classifier-free guidance
    null_label: int | None = None
    card: dict[str, Any] = field(default_factory=dict)  # sampling defaults (sampler, steps, guidance)
    sigma_data: float = 0.5  # EDM's sigma_data, for prediction edm / edm_v
    clip_x0: float | None = None  # clamp the clean estimate to [-clip_x0, clip_x0]
    data: str | None = None  # the training data spec (--data), if known


def is_factory_spec(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def _parse(spec: str) -> tuple[str, str]:
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    module, _, function = body.rpartition(":")
    if not module or not function or not all(p.isidentifier() for p in module.split(".") + [function]):
        raise UsageError(f"{spec}: a factory is factory:MODULE:FUNCTION (e.g. factory:my_models.teacher:build)")
    return module, function


def is_well_formed(spec: str) -> bool:
    """Whether ``spec`` reads as ``factory:MODULE:FUNCTION`` (without importing anything)."""
    try:
        _parse(spec)
    except UsageError:
        return False
    return True


def name_factory(spec: str) -> None:
    """Record that the user named this factory (the CLI or a recipe): it may run in this process and in the
    processes it starts for the same command (a benchmark's isolated measurements), through the environment."""
    module = _parse(spec)[0]
    _NAMED.add(module)
    listed = [m for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip()]
    if module not in listed:
        os.environ[TRUST_ENV] = ",".join([*listed, module])


def _trusted(module: str) -> bool:
    listed = {m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip()}
    return module in _NAMED or module in listed


def call_factory(spec: str, where: str = "") -> FactoryModel:
    """Import and call the factory ``spec`` (if trusted); its result as a :class:`FactoryModel`."""
    module, function = _parse(spec)
    if not _trusted(module):
        raise UsageError(f"{where or spec}: its network is built by the Python factory {module}:{function} (code); "
                         f"name it (factory:{module}:{function}) or set {TRUST_ENV}={module} to run it")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())  # searched last: nothing in the working directory shadows an installed module
    try:
        fn = getattr(importlib.import_module(module), function)
    except ImportError as e:
        raise UsageError(f"{spec}: cannot import {module} ({e}); put it on PYTHONPATH or in the working "
                         "directory") from None
    except AttributeError:
        raise UsageError(f"{spec}: {module} has no function {function}") from None
    except Exception as e:  # noqa: BLE001 (the module's own code failed on import: one line naming it)
        raise UsageError(f"{spec}: importing {module} failed ({type(e).__name__}: {e})") from None
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 (user code: one line naming the factory)
        raise UsageError(f"{spec}: the factory failed ({type(e).__name__}: {e})") from None
    if isinstance(out, tuple) and len(out) == 2:
        out = FactoryModel(*out)
    if not isinstance(out, FactoryModel) or not isinstance(out.net, nn.Module):
        raise UsageError(f"{spec}: the factory must return distill.factory.FactoryModel(net, schedule, ...) or a "
                         "(net, schedule) pair, with net a torch.nn.Module")
    return out


@dataclass
class FactoryConfig:
    """What rebuilds a factory network: the spec and the facts the denoiser needs from ``net.config``."""

    factory: str
    image_shape: tuple[int, int, int]
    num_classes: int = 0
    null_label: int | None = None
    guidance_embed: bool = False  # a factory network takes no guidance weight input

    @property
    def in_channels(self) -> int:
        return int(self.image_shape[0])

    @property
    def image_size(self) -> int:
        return int(self.image_shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "null_label": self.null_label}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FactoryConfig:
        shape = d.get("image_shape")
        if not (isinstance(d.get("factory"), str) and isinstance(shape, list) and len(shape) == 3):
            raise ValueError("a factory config holds 'factory' (module:function) and 'image_shape' [C, H, W]")
        if shape[1] != shape[2]:
            raise ValueError(f"image_shape {shape}: only square images are supported")
        null = d.get("null_label")
        return cls(d["factory"], tuple(int(v) for v in shape), int(d.get("num_classes") or 0),
                   None if null is None else int(null))


class FactoryNet(nn.Module):
    """The factory's network under the denoiser's interface (weights under ``net.``)."""

    def __init__(self, config: FactoryConfig, built: FactoryModel | None = None):
        super().__init__()
        self.config = config
        self.net = (built or call_factory(config.factory, "this model")).net

    def forward(self, x: Tensor, t_in: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.net(x, t_in, labels)


def _shape_of(built: FactoryModel, spec: str) -> tuple[int, int, int]:
    if built.image_shape is not None:
        return tuple(int(v) for v in built.image_shape)
    c = getattr(built.net, "config", None)
    try:
        return (int(c.in_channels), int(c.image_size), int(c.image_size))
    except AttributeError:
        raise UsageError(f"{spec}: give FactoryModel(image_shape=(C, H, W)); the network has no config to read it "
                         "from") from None


def factory_model_file(spec: str) -> Path:
    """The distill model file of the factory ``spec`` (converted when its weights change)."""
    import torch

    from distill.checkpoint import cached_conversion, save_model
    from distill.denoiser import Denoiser
    from distill.schedules import Schedule, schedule_from_config

    built = call_factory(spec)  # under the trust rule: the CLI or recipe named it, or the environment lists it
    try:
        schedule = built.schedule if isinstance(built.schedule, Schedule) else schedule_from_config(built.schedule)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{spec}: the factory's schedule: {e}") from None
    shape = _shape_of(built, spec)
    if shape[1] != shape[2]:
        raise UsageError(f"{spec}: image_shape {shape}: only square images are supported")
    cfg = FactoryConfig(spec, shape, int(built.num_classes or 0), built.null_label)
    net = FactoryNet(cfg, built)
    h = hashlib.sha256(spec.encode())
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    out, done = cached_conversion("factory", digest)
    if done:
        return out
    try:
        den = Denoiser(net, schedule, built.prediction, built.time_input, null_label=built.null_label,
                       clip_x0=built.clip_x0, sigma_data=built.sigma_data)
    except ValueError as e:
        raise UsageError(f"{spec}: {e}") from None
    with torch.no_grad():  # one call, so a network that does not fit its declared interface fails here
        x = torch.zeros(1, *cfg.image_shape)
        try:
            den(x, torch.full((1,), 0.5))
        except Exception as e:  # noqa: BLE001 (any error of user code, named in one line)
            raise UsageError(f"{spec}: the factory's network fails on a {tuple(x.shape)} input at t = 0.5 "
                             f"({type(e).__name__}: {e})") from None
    from distill.checkpoint import model_metadata

    meta = {**model_metadata(den), "card": dict(built.card or {}), "source": {"factory": spec, "digest": digest}}
    if built.data:
        meta["data"] = {"spec": built.data}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(out, net, meta)
    return out
