"""Recipes: one YAML file naming a teacher, distillation stages, exports, a benchmark and gates.

    name: digits-ci
    precision: auto                 # every training stage's default (bf16 only where the hardware runs it natively)
    teacher: mnist                  # a shipped name, a model file or a run folder; or a mapping: train one
    stages:                         # each takes the teacher or an earlier stage as its teacher
      - {name: pd, kind: progressive, start_steps: 16, target_steps: 2}
      - {name: cd, kind: consistency, teacher: teacher, steps: 200}
    exports:
      - {name: pd-int8, model: pd, precision: int8}
      - {name: pd-trt, kind: tensorrt, source: pd-int8, dry_run: true}
    benchmark: {models: [teacher, pd, cd], backends: [eager, onnxruntime], precisions: [fp32, int8], batches: [1, 64]}
    gates:
      - {kind: quality, model: pd, max_ratio: 3.0}

Everything is validated before anything runs: an unknown key names its path and the nearest valid key, a wrong
type names the field and the expected type. ``--set stages.pd.round_steps=50`` overrides a value (list entries are
addressed by their ``name``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from distill.app.gates import GATE_KINDS, Gate
from distill.app.stages.base import StageConfig, as_list, describe_error, field_path
from distill.app.stages.bench import BenchConfig, ModelEntry
from distill.app.stages.chain import ChainConfig
from distill.app.stages.export import DiffusersExportConfig, ExportConfig, TensorRTConfig
from distill.app.stages.train import ConsistencyConfig, DMDConfig, ProgressiveConfig, TeacherConfig
from distill.errors import ConfigError, UsageError
from distill.parsing import load_yaml

STAGE_KINDS: dict[str, type[StageConfig]] = {"progressive": ProgressiveConfig, "consistency": ConsistencyConfig,
                                             "dmd": DMDConfig, "chain": ChainConfig}
EXPORT_KINDS: dict[str, type[StageConfig]] = {"export": ExportConfig, "tensorrt": TensorRTConfig,
                                              "diffusers": DiffusersExportConfig}
TOP_KEYS = ("name", "description", "precision", "threads", "seed", "teacher", "stages", "exports", "benchmark",
            "gates")
DEFAULTED = ("precision", "threads", "seed")  # recipe-wide defaults of the stages that have these fields
TEACHER = "teacher"
RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"


class RecipeError(UsageError):
    """A recipe problem, naming the file and the key path (exit code 2)."""


@dataclass
class Entry:
    """One validated stage of a recipe: its name, kind, config and the earlier stages it reads."""

    name: str
    kind: str
    config: StageConfig
    needs: list[str] = field(default_factory=list)
    where: str = ""  # its key path in the recipe (stages[1]), named by errors the stage raises when it runs


@dataclass
class Recipe:
    source: str
    name: str
    raw: dict[str, Any]  # the resolved recipe (overrides applied), as written to resolved_recipe.yaml
    teacher: Entry | str  # a training stage, or a shipped name / file / run folder
    stages: list[Entry]
    exports: list[Entry]
    benchmark: Entry | None
    gates: list[Any]
    models: dict[str, str] = field(default_factory=dict)  # stage name -> the model file it makes
    export_dirs: dict[str, str] = field(default_factory=dict)  # export name -> its folder

    def entries(self) -> list[Entry]:
        first = [self.teacher] if isinstance(self.teacher, Entry) else []
        return first + self.stages + self.exports + ([self.benchmark] if self.benchmark else [])


def _fail(source: str, path: str, message: str) -> RecipeError:
    return RecipeError(f"{source}: {path}: {message}" if path else f"{source}: {message}")


def _check_keys(source: str, mapping: Any, allowed: list[str] | tuple[str, ...], path: str) -> None:
    if not isinstance(mapping, dict):
        raise _fail(source, path, f"expected a mapping, got {type(mapping).__name__} {mapping!r}")
    for key in mapping:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]}?" if near else f"; valid keys: {', '.join(allowed)}"
            raise _fail(source, f"{path}.{key}" if path else str(key), f"unknown key{hint}")


def _fields(cls) -> list[str]:
    return list(cls.model_fields)


def _validate(source: str, path: str, build, values: dict[str, Any]):
    """Build a config, naming the recipe's key path in any error."""
    try:
        return build(**values)
    except ValidationError as e:
        loc, msg = describe_error(e.errors()[0])
        loc = tuple(p for p in loc if p not in GATE_KINDS)  # the discriminator's tag is not a key of the file
        raise _fail(source, f"{path}.{field_path(loc)}" if loc else path, msg) from None
    except ConfigError as e:
        raise _fail(source, f"{path}.{e.field}" if e.field else path, e.message) from None
    except UsageError as e:
        raise _fail(source, path, str(e)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """A recipe file's mapping, with a one-line error for every way it can be unreadable."""
    if not path.exists() and (RECIPE_DIR / f"{path}.yaml").is_file():
        path = RECIPE_DIR / f"{path}.yaml"
    try:
        doc = load_yaml(path.read_bytes().decode("utf-8-sig"), str(path))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe; pass a YAML file (e.g. recipes/quickstart.yaml)") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a folder; pass a recipe YAML file") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise RecipeError(f"{path}: not valid YAML{f' (line {mark.line + 1})' if mark else ''}; fix the "
                          "syntax") from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with teacher:, stages:, exports:, benchmark:, gates:")
    return doc


def apply_override(source: str, raw: dict[str, Any], text: str) -> None:
    """``stages.pd.round_steps=50``: set one value (YAML syntax) in the raw recipe; list entries by name or index."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: write KEY.PATH=VALUE, e.g. stages.cd.steps=200")
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[:i + 1])
        if isinstance(node, list):
            named = [e for e in node if isinstance(e, dict) and str(e.get("name")) == part]
            if named:
                node = named[0]
            elif part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                names = [str(e.get("name")) for e in node if isinstance(e, dict)]
                raise RecipeError(f"--set {text}: {where}: no entry named {part} (entries: {', '.join(names)})")
        elif isinstance(node, dict):
            if part not in node or not isinstance(node[part], (dict, list)):
                node[part] = {} if part not in node else node[part]
                if not isinstance(node[part], dict):
                    raise RecipeError(f"--set {text}: {where} is a value, not a mapping")
            node = node[part]
        else:
            raise RecipeError(f"--set {text}: {where} is a value, not a mapping")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise RecipeError(f"--set {text}: the value is not valid YAML") from None
    if isinstance(node, list):  # a whole entry, by name or index: stages.pd={...}
        last = parts[-1]
        named = [i for i, e in enumerate(node) if isinstance(e, dict) and str(e.get("name")) == last]
        index = named[0] if named else int(last) if last.isdigit() and int(last) < len(node) else None
        if index is None:
            raise RecipeError(f"--set {text}: {'.'.join(parts[:-1])} has no entry {last}; name an entry, e.g. "
                              "stages.NAME.key=VALUE")
        node[index] = parsed
        return
    node[parts[-1]] = parsed


def _ref(source: str, path: str, value: Any, known: dict[str, str], what: str) -> tuple[str, str | None]:
    """A reference to an earlier stage (its model path, and its name) or a model given as it is."""
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, path, f"expected {what}: an earlier stage's name or a model, got {value!r}")
    if value in known:
        return known[value], value
    return value, None


def load_recipe(path: Path | str, overrides: tuple[str, ...] = (), out: Path | None = None) -> Recipe:
    """Read, override and validate a recipe; stage outputs are planned under ``out`` (``runs/NAME`` by default)."""
    from distill.app.plan import planned_model

    path = Path(path)
    raw = read_yaml(path)
    source = str(path)
    for text in overrides:
        apply_override(source, raw, text)
    _check_keys(source, raw, TOP_KEYS, "")
    name = str(raw.get("name") or path.stem)
    out = Path(out) if out is not None else Path("runs") / name
    defaults = {k: raw[k] for k in DEFAULTED if raw.get(k) is not None}

    def with_defaults(cls, values: dict[str, Any]) -> dict[str, Any]:
        from distill.app.stages.train import TrainFields

        # the recipe's precision is the training precision (auto/fp32/bf16), not an export's
        take = {k: v for k, v in defaults.items() if k in cls.model_fields
                and (k != "precision" or issubclass(cls, TrainFields))}
        return {**take, **values}

    known: dict[str, str] = {}  # stage name -> the model file it makes
    exports: dict[str, str] = {}  # export name -> its folder
    if "teacher" not in raw:
        raise _fail(source, "teacher", "missing; name a shipped model (mnist), a model file or a run folder, or give "
                    "a mapping of teacher training settings")
    t = raw["teacher"]
    if isinstance(t, dict):
        _check_keys(source, t, _fields(TeacherConfig), "teacher")
        cfg = _validate(source, "teacher", TeacherConfig.build, with_defaults(TeacherConfig, t))
        teacher: Entry | str = Entry(TEACHER, "teacher", cfg, where="teacher")
        known[TEACHER] = str(planned_model(teacher, out / TEACHER))
    elif isinstance(t, str) and t.strip():
        teacher = t
        known[TEACHER] = t
        from distill.factory import is_factory_spec, name_factory

        if is_factory_spec(t):  # a factory the recipe names may run in this run (distill.factory's trust rule)
            try:
                name_factory(t)
            except UsageError as e:
                raise _fail(source, "teacher", str(e)) from None
    else:
        raise _fail(source, "teacher", f"expected a model name, file or run folder, or a mapping; got {t!r}")

    names = {TEACHER}

    def entry_name(i: int, e: dict, section: str) -> str:
        n = e.get("name")
        if not isinstance(n, str) or not n.strip():
            raise _fail(source, f"{section}[{i}].name", "missing; give each entry a name (its folder in the run)")
        if n in names or "/" in n or n.startswith("."):
            raise _fail(source, f"{section}[{i}].name", f"{n!r} is taken or not a folder name; choose another")
        names.add(n)
        return n

    stages: list[Entry] = []
    for i, e in enumerate(_list(source, raw, "stages")):
        where = f"stages[{i}]"
        _check_keys(source, e, ["name", "kind", *sorted({f for c in STAGE_KINDS.values() for f in _fields(c)})],
                    where)
        kind = e.get("kind")
        if kind not in STAGE_KINDS:
            near = difflib.get_close_matches(str(kind), list(STAGE_KINDS), n=1)
            raise _fail(source, f"{where}.kind", f"{kind!r}: use {' or '.join(STAGE_KINDS)}"
                        + (f" (did you mean {near[0]}?)" if near else ""))
        cls = STAGE_KINDS[kind]
        _check_keys(source, e, ["name", "kind", *_fields(cls)], where)
        n = entry_name(i, e, "stages")
        values = {k: v for k, v in e.items() if k not in ("name", "kind")}
        parents: list[str] = []
        if kind == "chain":  # no teacher: its models, each an earlier stage or a model as given
            models = values.get("models")
            if not isinstance(models, list) or not models:
                raise _fail(source, f"{where}.models", "give the chain's models in sampling order, e.g. [dmd, cd]")
            refs = [_ref(source, f"{where}.models[{j}]", m, known, "a model") for j, m in enumerate(models)]
            values["models"] = [m for m, _ in refs]
            parents += list(dict.fromkeys(n for _, n in refs if n))
        else:
            model, parent = _ref(source, f"{where}.teacher", values.get("teacher", TEACHER), known, "a teacher")
            values["teacher"] = model
            parents += [parent] if parent else []
        if values.get("init") is not None:  # dmd: the generator's starting point, an earlier stage or a model
            values["init"], init_parent = _ref(source, f"{where}.init", values["init"], known, "a model")
            parents += [init_parent] if init_parent and init_parent not in parents else []
        cfg = _validate(source, where, cls.build, with_defaults(cls, values))
        entry = Entry(n, kind, cfg, parents, where)
        stages.append(entry)
        known[n] = str(planned_model(entry, out / n))

    export_entries: list[Entry] = []
    for i, e in enumerate(_list(source, raw, "exports")):
        where = f"exports[{i}]"
        kind = e.get("kind", "export") if isinstance(e, dict) else None
        if kind not in EXPORT_KINDS:
            raise _fail(source, f"{where}.kind", f"{kind!r}: use export (ONNX), tensorrt or diffusers")
        cls = EXPORT_KINDS[kind]
        _check_keys(source, e, ["name", "kind", *_fields(cls)], where)
        n = entry_name(i, e, "exports")
        values = {k: v for k, v in e.items() if k not in ("name", "kind")}
        if kind in ("export", "diffusers"):
            values["model"], parent = _ref(source, f"{where}.model", values.get("model"), known, "a model")
        else:
            values["source"], parent = _ref(source, f"{where}.source", values.get("source"), exports, "an export")
        cfg = _validate(source, where, cls.build, with_defaults(cls, values))
        export_entries.append(Entry(n, kind, cfg, [parent] if parent else [], where))
        exports[n] = str(out / n)

    bench = None
    if raw.get("benchmark") is not None:
        b = dict(raw["benchmark"]) if isinstance(raw["benchmark"], dict) else raw["benchmark"]
        _check_keys(source, b, _fields(BenchConfig), "benchmark")
        needs, models = [], []
        for i, m in enumerate(b.get("models") or []):
            m = {"model": m} if isinstance(m, str) else m
            _check_keys(source, m, _fields(ModelEntry), f"benchmark.models[{i}]")
            model, parent = _ref(source, f"benchmark.models[{i}].model", m.get("model"), known, "a model")
            models.append({**m, "model": model})
            needs += [parent] if parent else []
        b["models"] = models
        if "use_exports" in b:  # export names (or folders) given: those
            named = [_ref(source, f"benchmark.use_exports[{i}]", v, exports, "an export")
                     for i, v in enumerate(as_list(b["use_exports"]) or [])]
            b["use_exports"] = [folder for folder, _ in named]
            needs += [n for _, n in named if n]
        else:  # by default the benchmark runs the recipe's own ONNX exports of its models
            benched = {m["model"] for m in models}
            used = [e for e in export_entries if e.kind == "export" and e.config.model in benched]
            b["use_exports"] = [exports[e.name] for e in used]
            needs += [e.name for e in used]
        cfg = _validate(source, "benchmark", BenchConfig.build, with_defaults(BenchConfig, b))
        bench = Entry("bench", "benchmark", cfg, needs, "benchmark")

    gates = []
    adapter = TypeAdapter(Gate)
    for i, g in enumerate(_list(source, raw, "gates")):
        where = f"gates[{i}]"
        kind = g.get("kind") if isinstance(g, dict) else None
        if kind not in GATE_KINDS:
            raise _fail(source, f"{where}.kind", f"{kind!r}: use one of {', '.join(GATE_KINDS)}")
        _check_keys(source, g, ["kind", *_fields(GATE_KINDS[kind])], where)
        gate = _validate(source, where, lambda **v: adapter.validate_python(v), g)
        # a model a gate names may be a stage or a model the table names as given; an export must be the recipe's
        if kind == "parity" and gate.export not in exports:
            raise _fail(source, f"{where}.export", f"{gate.export!r} is not an export of this recipe ("
                        f"{', '.join(exports) or 'none'})")
        if bench is None and kind != "parity":
            raise _fail(source, where, f"a {kind} gate reads the benchmark table; add a benchmark: section")
        gates.append(gate)
    return Recipe(source, name, raw, teacher, stages, export_entries, bench, gates, known, exports)


def _list(source: str, raw: dict[str, Any], key: str) -> list:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise _fail(source, key, f"expected a list of entries, got {type(value).__name__}")
    return value
