"""What each kind of recipe entry makes, how it runs, and its equivalent command: the one table the runner and
``--dry-run`` share."""

from __future__ import annotations

from pathlib import Path

from distill.app.stages.base import StageResult


def planned_model(entry, folder: Path) -> Path:
    """The model file a training entry will write into ``folder`` (known before it runs, so later stages can name
    it)."""
    from distill.training import MODEL_FILE

    if entry.kind == "progressive":
        return folder / f"steps-{entry.config.target_steps}" / MODEL_FILE
    if entry.kind == "chain":  # the chain folder is what sample, eval, export and bench take
        return folder
    return folder / MODEL_FILE


def commands(entry, folder: Path) -> list[str]:
    """The ``distill`` command lines that do what ``entry`` does, into ``folder``."""
    if entry.kind == "benchmark":
        return entry.config.commands(folder)
    return [entry.config.command(folder)]


def run_entry(entry, folder: Path, *, progress: bool = True) -> StageResult:
    """Run one recipe entry into ``folder`` (each stage resumes where a killed run of it stopped)."""
    from distill.app.stages.bench import run_bench
    from distill.app.stages.chain import run_chain
    from distill.app.stages.export import run_diffusers_export, run_export, run_tensorrt
    from distill.app.stages.train import run_consistency, run_dmd, run_progressive, run_teacher

    cfg, cmd = entry.config, commands(entry, folder)[0]
    if entry.kind == "teacher":
        return run_teacher(cfg, folder, command=cmd, progress=progress)
    if entry.kind == "progressive":
        return run_progressive(cfg, folder, command=cmd, progress=progress)
    if entry.kind == "consistency":
        return run_consistency(cfg, folder, command=cmd, progress=progress)
    if entry.kind == "dmd":
        return run_dmd(cfg, folder, command=cmd, progress=progress)
    if entry.kind == "chain":
        return run_chain(cfg, folder, command=cmd)
    if entry.kind == "export":
        return run_export(cfg, folder, command=cmd)
    if entry.kind == "tensorrt":
        return run_tensorrt(cfg, folder, command=cmd)
    if entry.kind == "diffusers":
        return run_diffusers_export(cfg, folder, command=cmd)
    if entry.kind == "benchmark":
        return run_bench(cfg, folder)
    raise ValueError(f"unknown entry kind {entry.kind}")
