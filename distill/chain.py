"""Hybrid few-step sampling: a chain of students, one network evaluation each.

Step ``i`` runs member ``i`` at time ``t_i`` and the clean estimate is noised afresh to ``t_{i+1}`` (the multistep
consistency sampler, :func:`~distill.samplers.sample_consistency`, with one denoiser per interval): e.g. one step of
a one-step student from the top of its grid, then one step of a consistency student from a searched re-noise level.
The first member reads at its own one-step time (:func:`~distill.checkpoint.one_step_time`); the later levels are
given or searched (``distill chain``).

A chain is a folder: ``chain.json`` (format, the members' files with their sha256, the steps, the card) and
``members/`` holding a copy of every member's model file, so the folder is complete on its own; loading checks each
copy against its recorded sha256. It samples through the same path as a fused sampler graph (``kind ==
"sampler"``), so ``distill sample`` / ``eval`` take it, and ``distill export onnx CHAIN --fused`` unrolls it into one
graph.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.denoiser import Cond, Denoiser
from distill.errors import UsageError

CHAIN_FILE = "chain.json"
CHAIN_FORMAT = "distill.chain/1"
MEMBERS_DIR = "members"


def chain_dir(source: str | Path) -> Path:
    """The folder of a chain: ``source`` itself, or a shipped chain's by name (``distill/weights/NAME/``, whose
    ``chain.json`` names the shipped member files beside it instead of copies)."""
    from distill.checkpoint import SHIPPED_DIR

    path = Path(source)
    if not path.exists() and path.name == str(path) and (SHIPPED_DIR / path / CHAIN_FILE).is_file():
        return SHIPPED_DIR / path
    return path


def is_chain(source: str | Path) -> bool:
    """Whether ``source`` is a chain folder (holds ``chain.json``) or a shipped chain's name."""
    try:
        return (chain_dir(source) / CHAIN_FILE).is_file()
    except (OSError, ValueError):
        return False


def check_members(members: Sequence[Denoiser], names: Sequence[str]) -> None:
    """Refuse members that cannot share one trajectory: another noise schedule, image shape or label set, or a
    latent model (the chain runs in pixel space)."""
    first, name0 = members[0], names[0]
    for den, name in zip(members, names):
        if den.latent:
            raise UsageError(f"{name}: a latent model; a chain runs pixel-space students only")
        if den.schedule.config() != first.schedule.config():
            raise UsageError(f"{name}: its noise schedule differs from {name0}'s; chain students of one teacher")
        if den.image_shape != first.image_shape:
            raise UsageError(f"{name}: images of shape {den.image_shape}, {name0}'s are {first.image_shape}; chain "
                             "students of one teacher")
        if den.num_classes != first.num_classes:
            raise UsageError(f"{name}: {den.num_classes or 'no'} classes, {name0} has {first.num_classes or 'none'}; "
                             "chain students of one teacher")


def check_times(times: Sequence[float], option: str = "--times") -> None:
    """``times``: one reading time per step, strictly decreasing, in (0, 1]."""
    if any(not 0.0 < t <= 1.0 for t in times):
        raise UsageError(f"{option} {','.join(f'{t:g}' for t in times)}: every time must lie in (0, 1]")
    if any(b >= a for a, b in zip(times, times[1:])):
        raise UsageError(f"{option} {','.join(f'{t:g}' for t in times)}: the times must decrease step by step")


class Chain(nn.Module):
    """The chained sampler: ``members`` (loaded denoisers, each used once or more), ``steps`` as ``(member index,
    time)`` pairs in sampling order, and the chain's ``metadata`` (its card). A backend of ``kind == "sampler"``:
    :meth:`sample` draws whole images from per-sample seeds."""

    kind = "sampler"
    name = "eager"

    def __init__(self, members: Sequence[Denoiser], steps: Sequence[tuple[int, float]], metadata: dict[str, Any],
                 names: Sequence[str] | None = None, device: str = "cpu", precision: str = "fp32"):
        super().__init__()
        if not members or not steps:
            raise ValueError("a chain needs at least one member and one step")
        names = list(names or [f"member {i}" for i in range(len(members))])
        check_members(members, names)
        self.members = nn.ModuleList(members)
        self.plan = [(int(i), float(t)) for i, t in steps]
        if any(not 0 <= i < len(members) for i, _ in self.plan):
            raise ValueError(f"a step names a member outside 0-{len(members) - 1}")
        check_times([t for _, t in self.plan])
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"a chain samples in fp32 or bf16 (autocast), not {precision}")
        self.metadata, self.device, self.precision = metadata, device, precision

    def forward(self, *args, **kwargs):
        raise TypeError("a chain has no single denoiser call; sample it (Chain.sample) or run the consistency "
                        "sampler on it")

    @property
    def step_denoisers(self) -> list[Denoiser]:
        return [self.members[i] for i, _ in self.plan]

    @property
    def times(self) -> list[float]:
        return [t for _, t in self.plan] + [0.0]

    @property
    def manifest(self) -> dict[str, Any]:
        return {"sampler": "consistency", "steps": len(self.plan), "timesteps": self.times}

    @property
    def schedule(self):
        return self.members[0].schedule

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.members[0].image_shape

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def null_label(self) -> int | None:
        labels = {m.null_label for m in self.members}
        return labels.pop() if len(labels) == 1 else None

    @property
    def guidance_input(self) -> bool:
        """Every member takes ``w``: only then can the chain be sampled at a chosen guidance weight."""
        return all(m.guidance_input for m in self.members)

    @property
    def latent(self):
        return None

    @torch.no_grad()
    def sample(self, seeds: Sequence[int], cond: Cond | None = None) -> Tensor:
        from distill.samplers import generate

        cond = cond if cond is not None else Cond()
        if cond.guided and not self.guidance_input:
            raise UsageError("--guidance: this chain holds students distilled at a fixed guidance weight (not "
                             "every member takes w); drop --guidance")
        with torch.autocast(torch.device(self.device).type, torch.bfloat16, enabled=self.precision == "bf16"):
            return generate(self, self.image_shape, list(seeds), sampler="consistency", steps=len(self.plan),
                            timesteps=self.times, cond=cond, device=self.device)


def chain_card(sources: Sequence[str], members: Sequence[Denoiser], plan: Sequence[tuple[int, float]],
               search: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The chain's card: what each step runs, the grid, and how the levels were chosen."""
    times = [t for _, t in plan] + [0.0]
    guided = all(m.guidance_input for m in members)
    first = members[0].metadata.get("card") or {}
    return {"method": "chain", "sampler": "consistency", "steps": len(plan), "spacing": "own", "timesteps": times,
            "timesteps_by_steps": {str(len(plan)): times},
            "chain": [{"member": i, "model": str(sources[i]), "t": t} for i, t in plan],
            "guidance": float(first.get("guidance", 0.0)) if guided else 0.0,
            "distilled_guidance": first.get("distilled_guidance", first.get("guidance", 0.0)),
            "search": search or []}


def write_chain(out: Path, sources: Sequence[str], plan: Sequence[tuple[int, float]], card: dict[str, Any],
                command: str = "") -> Path:
    """Write the chain folder ``out``: the member files copied under ``members/`` and ``chain.json`` (written
    last, in a staged folder that replaces ``out`` only when complete). Returns ``out / chain.json``."""
    from distill.checkpoint import file_sha256, read_metadata, resolve_model_path
    from distill.rundir import staged_dir

    out = Path(out)
    paths = [resolve_model_path(s) for s in sources]
    first = read_metadata(paths[0])
    # the first member's description (network, diffusion, data: what a fused graph's runtime reads), the chain's card
    drop = ("card", "command", "method", "train", "training")
    metadata = {**{k: v for k, v in first.items() if k not in drop}, "card": card, "command": command}
    with staged_dir(out) as stage:
        (stage / MEMBERS_DIR).mkdir()
        files = []
        for i, (src, path) in enumerate(zip(sources, paths)):
            name = f"{MEMBERS_DIR}/{i}.safetensors"
            shutil.copyfile(path, stage / name)
            files.append({"file": name, "source": str(src), "sha256": file_sha256(stage / name)})
        record = {"format": CHAIN_FORMAT, "members": files, "steps": [{"member": i, "t": t} for i, t in plan],
                  "metadata": metadata}
        (stage / CHAIN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out / CHAIN_FILE


def read_chain(source: str | Path) -> dict[str, Any]:
    """``chain.json`` of a chain folder, its format checked, with one line for a damaged or foreign file."""
    folder = chain_dir(source)
    file = folder / CHAIN_FILE
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{file}: unreadable ({e}); write the chain again with distill chain") from None
    if not isinstance(record, dict) or record.get("format") != CHAIN_FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise UsageError(f"{file}: not a distill chain (format {found!r}); write the chain again with distill chain")
    try:
        record["plan"] = [(int(s["member"]), float(s["t"])) for s in record["steps"]]
        record["files"] = [(folder / m["file"], str(m["sha256"]), str(m.get("source", m["file"])))
                           for m in record["members"]]
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{file}: malformed ({type(e).__name__}: {e}); write the chain again with distill "
                         "chain") from None
    return record


def load_chain(source: str | Path, device: str = "cpu", precision: str = "fp32") -> Chain:
    """Open a chain folder: every member file checked against the sha256 recorded when the chain was written."""
    from distill.checkpoint import file_sha256, load_denoiser

    record = read_chain(source)
    members = []
    for path, digest, _ in record["files"]:
        if not path.is_file():
            raise UsageError(f"{source}: member file {path.name} is missing; write the chain again with distill "
                             "chain")
        if file_sha256(path) != digest:
            raise UsageError(f"{path}: its sha256 differs from the one recorded in {CHAIN_FILE} (the file changed or "
                             "is damaged); write the chain again with distill chain")
        members.append(load_denoiser(path, device))
    try:
        return Chain(members, record["plan"], record["metadata"], [n for _, _, n in record["files"]], device=device,
                     precision=precision)
    except ValueError as e:
        raise UsageError(f"{source}/{CHAIN_FILE}: {e}; write the chain again with distill chain") from None
