"""``distill run RECIPE``: every stage of a recipe into one run folder, with one cache.

    OUT/resolved_recipe.yaml   the recipe as run (overrides applied)
    OUT/manifest.json          versions, git revision, machine, seeds, hashes, per-stage timings and commands
    OUT/<stage>/               one folder per stage; OUT/bench/ holds the benchmark and its report
    OUT/<stage>/stage.json     the stage's completion record, written after every file the stage produces
    OUT/logs/<stage>.log       each stage's log lines (appended across resumes)
    OUT/gates.json             the gates' verdicts

A stage's cache key is the hash of its resolved config, of its inputs' contents and of the keys of the stages it
reads. A stage whose completion record holds its key, and whose outputs still hash as recorded, is skipped; a stage
whose key changed is removed and rerun (and, its key being part of theirs, everything downstream of it); a stage
killed midway is rerun in its folder, where it resumes (training continues from its last checkpoint exactly).
Nothing counts as done without its completion record, and the record is written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.app.manifest import file_digest, git_revision, machine, now, path_digest, read_json, versions, write_json
from distill.app.plan import commands, run_entry
from distill.app.recipe import Entry, Recipe, RecipeError
from distill.app.stages.base import StageResult, log, options_error
from distill.errors import ConfigError, DistillError, UsageError

RECORD, KEY_FILE, MANIFEST, GATES = "stage.json", ".stage-key", "manifest.json", "gates.json"
RUN_FORMAT = "distill.run/1"


@dataclass
class RunSummary:
    out: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    gates: list[Any] = field(default_factory=list)
    cards: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "passed": self.passed, "stages": self.stages,
                "gates": [g.as_dict() for g in self.gates], "cards": [str(c) for c in self.cards]}


def _inputs(entry: Entry) -> list[str]:
    cfg = entry.config
    if entry.kind == "benchmark":
        return [m.model for m in cfg.models] + list(cfg.use_exports)
    values = [getattr(cfg, f) for f in type(cfg).inputs if getattr(cfg, f, None)]
    return [v for value in values for v in (value if isinstance(value, list) else [value])]  # a chain's models


def _digest_input(value: str, made: dict[str, str]) -> str:
    """The content hash of an input: an earlier stage's recorded output, or a model / export given as it is."""
    if value in made:
        return made[value]
    from distill.chain import is_chain
    from distill.checkpoint import resolve_model_path

    p = Path(value)
    if p.is_dir() and ((p / "manifest.json").is_file() or is_chain(p)):
        return path_digest(p)  # an export or a chain folder
    return file_digest(resolve_model_path(value))  # a missing model: its one-line UsageError


def stage_key(entry: Entry, made: dict[str, str], keys: dict[str, str], out: Path) -> tuple[str, dict[str, str]]:
    """The stage's cache key: its resolved config, its inputs' contents and the keys of the stages it reads. Paths
    inside the run folder count relative to it, so a run folder that moves keeps its cache."""
    inputs = {v: _digest_input(v, made) for v in _inputs(entry)}
    text = json.dumps({"kind": entry.kind, "config": entry.config.cache_record(), "inputs": inputs,
                       "after": {n: keys[n] for n in entry.needs if n in keys}}, sort_keys=True)
    text = text.replace(json.dumps(str(out) + os.sep)[1:-1], "$RUN/")
    return hashlib.sha256(text.encode()).hexdigest(), inputs


def output_path(out: Path, recorded: str) -> Path:
    """An output path as recorded (relative to the run folder, so that a run folder can move) -> a path."""
    return Path(out) / recorded


def _outputs(result: StageResult, folder: Path) -> dict[str, dict[str, str]]:
    outputs = {}
    for name, p in result.outputs.items():
        p = Path(p)
        if not p.exists():
            raise DistillError(f"{folder}: the stage reported {name} = {p}, which does not exist")
        outputs[name] = {"path": os.path.relpath(p, folder.parent), "sha256": path_digest(p)}
    return outputs


def _intact(record: dict[str, Any], out: Path) -> bool:
    return all(output_path(out, o["path"]).exists() and path_digest(output_path(out, o["path"])) == o["sha256"]
               for o in record.get("outputs", {}).values())


def cached(folder: Path, key: str) -> dict[str, Any] | None:
    """The completion record of ``folder`` when it is complete for ``key`` and its outputs are intact."""
    record = read_json(folder / RECORD)
    return record if record and record.get("key") == key and _intact(record, folder.parent) else None


def _made_by(record: dict[str, Any], entry: Entry, recipe: Recipe, out: Path) -> dict[str, str]:
    """The outputs later stages name (a model file, an export folder) -> their content hash."""
    made = {str(output_path(out, o["path"])): o["sha256"] for o in record["outputs"].values()}
    if entry.name in recipe.models and "model" in record["outputs"]:
        made[recipe.models[entry.name]] = record["outputs"]["model"]["sha256"]
    if entry.name in recipe.export_dirs and "export" in record["outputs"]:
        made[recipe.export_dirs[entry.name]] = record["outputs"]["export"]["sha256"]
    return made


def plan(recipe: Recipe, out: Path) -> list[dict[str, Any]]:
    """Each entry with its folder, commands and whether a run now would skip it (reads, writes nothing)."""
    rows, made, keys = [], {}, {}
    for entry in recipe.entries():
        folder = out / entry.name
        try:
            key, _ = stage_key(entry, made, keys, out)
        except UsageError:
            key = None  # an input made by an earlier stage that has not run yet
        record = cached(folder, key) if key else None
        if record:
            made.update(_made_by(record, entry, recipe, out))
            keys[entry.name] = key
        rows.append({"name": entry.name, "kind": entry.kind, "folder": str(folder),
                     "status": "cached" if record else "to run", "commands": commands(entry, folder)})
    return rows


def resolved_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.raw, sort_keys=False, default_flow_style=None)


def run_recipe(recipe: Recipe, out: Path, *, progress: bool = True) -> RunSummary:
    """Run (or continue) ``recipe`` in ``out``; returns the summary with the gates' verdicts (a failed gate does
    not raise here: the caller decides the exit code)."""
    from distill.checkpoint import atomic_write
    from distill.preflight import check_output_dir
    from distill.rundir import run_lock

    out = Path(out)
    check_output_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(out)
    with run_lock(out):
        atomic_write(out / "resolved_recipe.yaml", lambda tmp: Path(tmp).write_text(resolved_yaml(recipe)))
        manifest = _start_manifest(recipe, out)
        made: dict[str, str] = {}
        keys: dict[str, str] = {}
        entries = recipe.entries()
        for i, entry in enumerate(entries, 1):
            folder = out / entry.name
            tag = f"[{i}/{len(entries)}] {entry.name} ({entry.kind})"
            key, inputs = stage_key(entry, made, keys, out)
            record = cached(folder, key)
            if record:
                log.info(f"{tag}: done earlier, cached ({folder})")
                status = "cached"
            else:
                record = _run_stage(entry, folder, key, inputs, tag, progress, recipe.source)
                status = "ran"
            made.update(_made_by(record, entry, recipe, out))
            keys[entry.name] = key
            summary.stages[entry.name] = {"kind": entry.kind, "status": status, "key": key,
                                          "seconds": record["seconds"], "commands": record["commands"],
                                          "outputs": record["outputs"], "inputs": record["inputs"],
                                          "record": record["record"]}
            manifest["stages"][entry.name] = {k: v for k, v in summary.stages[entry.name].items()
                                              if k != "status"} | {"finished": record["finished"]}
            write_json(out / MANIFEST, manifest)
        _finish(recipe, out, summary, manifest)
    return summary


def stage_error(e: UsageError, entry: Entry, source: str) -> RecipeError:
    """A stage's own check failing while it runs (its data, its teacher): the message naming the recipe's key path
    and keys where the library wrote command-line flags (``--data digits: ...`` -> ``recipe.yaml: teacher.data:
    ...``)."""
    if isinstance(e, RecipeError):
        return e
    if not isinstance(e, ConfigError):
        e = options_error(e, type(entry.config))
    where = f"{entry.where}.{e.field}" if e.field in type(entry.config).model_fields else entry.where
    return RecipeError(f"{source}: {where}: {e.message}" if where else f"{source}: {e.message}")


def _run_stage(entry: Entry, folder: Path, key: str, inputs: dict[str, str], tag: str,
               progress: bool, source: str) -> dict[str, Any]:
    from distill.checkpoint import atomic_write

    if folder.exists() and (not (folder / KEY_FILE).is_file() or (folder / KEY_FILE).read_text().strip() != key):
        if any(folder.iterdir()):
            log.info(f"{tag}: its settings or inputs changed; removing {folder} and running it again")
        shutil.rmtree(folder)
    resumed = folder.exists() and any(p.name not in (KEY_FILE, ".lock") for p in folder.iterdir())
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / KEY_FILE, lambda tmp: Path(tmp).write_text(key + "\n"))
    cmds = commands(entry, folder)
    logfile = folder.parent / "logs" / f"{entry.name}.log"  # beside the folder: an export replaces its folder whole
    logfile.parent.mkdir(exist_ok=True)
    handler = logging.FileHandler(logfile)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    try:
        log.info(f"{tag}: {'resuming' if resumed else 'running'}: {cmds[0]}")
        start, started = time.perf_counter(), now()
        try:
            result = run_entry(entry, folder, progress=progress)
        except UsageError as e:
            raise stage_error(e, entry, source) from None
        seconds = round(time.perf_counter() - start, 1)
    finally:
        log.removeHandler(handler)
        handler.close()
    record = {"format": RUN_FORMAT, "name": entry.name, "kind": entry.kind, "key": key,
              "config": entry.config.model_dump(mode="json"), "inputs": inputs, "commands": cmds,
              "outputs": _outputs(result, folder), "record": result.record, "seconds": seconds,
              "started": started, "finished": now(), "resumed": resumed, "log": str(logfile)}
    write_json(folder / RECORD, record)  # last: only now is the stage complete
    log.info(f"{tag}: done in {seconds:.0f} s")
    return record


def _start_manifest(recipe: Recipe, out: Path) -> dict[str, Any]:
    old = read_json(out / MANIFEST) or {}
    teacher = recipe.teacher if isinstance(recipe.teacher, str) else None
    inputs = {}
    if teacher:
        from distill.checkpoint import resolve_model_path

        path = resolve_model_path(teacher)
        inputs["teacher"] = {"spec": teacher, "path": str(path), "sha256": file_digest(path)}
    seeds = {e.name: e.config.seed for e in recipe.entries() if hasattr(e.config, "seed")}
    return {"format": RUN_FORMAT, "recipe": recipe.source, "name": recipe.name,
            "created": old.get("created", now()), "updated": now(), "git": git_revision(), "versions": versions(),
            "machine": machine(), "seeds": seeds, "inputs": inputs,
            "stages": {k: v for k, v in (old.get("stages") or {}).items()
                       if k in {e.name for e in recipe.entries()}}}


def _finish(recipe: Recipe, out: Path, summary: RunSummary, manifest: dict[str, Any]) -> None:
    """Model cards from the manifest, then the gates (cheap: they run on every run, cached stages or not)."""
    from distill.app.cards import write_cards
    from distill.app.gates import check_gate

    table = None
    if recipe.benchmark is not None and "report_csv" in summary.stages.get("bench", {}).get("outputs", {}):
        from benchmarks.bench.report import load_table

        table = load_table(output_path(out, summary.stages["bench"]["outputs"]["report_csv"]["path"]))
    summary.cards = write_cards(recipe, out, manifest, table)
    exports = {n: Path(p) for n, p in recipe.export_dirs.items()}
    summary.gates = [check_gate(g, table=table, models=recipe.models, exports=exports) for g in recipe.gates]
    manifest["gates"] = [g.as_dict() for g in summary.gates]
    manifest["cards"] = [str(c) for c in summary.cards]
    write_json(out / GATES, {"passed": summary.passed, "gates": manifest["gates"]})
    write_json(out / MANIFEST, manifest)
