"""Recipes and the stage API: validation before anything runs, overrides, the dry run, the one cache (a finished run
is a no-op, a changed stage reruns with what is downstream of it), gates and their exit code, cards and the
manifest, a run from Python through the stage functions alone, and SIGKILL at several moments."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DIGITS_CI = ROOT / "recipes" / "digits-ci.yaml"
# digits-ci made smaller still (the tests check the machinery; the recipe itself is timed by its own run): the
# benchmark keeps the teacher on eager and the progressive student on eager and ONNX Runtime, fp32 and INT8 (the
# recipe's own exports), so every gate kind has its rows
TINY = ("threads=1", "teacher.steps=40", "teacher.channels=8", "teacher.ckpt_every=20", "teacher.batch_size=32",
        "stages.pd.start_steps=8", "stages.pd.target_steps=2", "stages.pd.round_steps=8", "stages.pd.batch_size=16",
        "stages.pd.ckpt_every=4", "stages.cd.steps=10", "stages.cd.batch_size=16", "stages.cd.ckpt_every=5",
        "stages.cd.search_samples=40", "exports.pd-int8.calib_samples=4", "benchmark.samples=40",
        "benchmark.models=[{model: teacher, samplers: [ddim], steps: [8], backends: [eager]}, pd]",
        "benchmark.batches=[1,8]", "benchmark.repeats=3", "benchmark.max_seconds=0.2", "benchmark.report_batch=8",
        "gates.2.max_ratio=1000", "gates.3.max_ratio=100", "gates.4.min=0.01", "gates.4.batch=8")
def write(tmp_path: Path, doc: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


BASE = {"name": "t", "teacher": "mnist",
        "stages": [{"name": "pd", "kind": "progressive", "start_steps": 8, "target_steps": 2}],
        "exports": [{"name": "pd-fp32", "model": "pd"}]}


# -- validation before anything runs -------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, want", [
    (lambda d: d["stages"][0].update(start_step=8), "stages[0].start_step: unknown key; did you mean start_steps?"),
    (lambda d: d["stages"][0].update(start_steps="many"), "stages[0].start_steps: expected an integer, got 'many'"),
    (lambda d: d["stages"][0].update(kind="progresive"), "stages[0].kind: 'progresive'"),
    (lambda d: d.update(stagez=[]), "stagez: unknown key; did you mean stages?"),
    (lambda d: d["exports"][0].update(model="nope"), None),
    (lambda d: d["exports"][0].update(calib_method="entropy"), "exports[0].calib_method: applies to precision int8"),
    (lambda d: d["stages"][0].update(start_steps=6), "stages[0].start_steps: 6 must be"),
    (lambda d: d.update(gates=[{"kind": "quality", "model": "pd", "max": 1}]), "add a benchmark"),
    (lambda d: d.update(gates=[{"kind": "parity", "export": "pd-int8"}]),
     "gates[0].export: 'pd-int8' is not an export"),
    (lambda d: d.update(gates=[{"kind": "qualty"}]), "gates[0].kind"),
    (lambda d: d.update(benchmark={"models": ["pd"], "backend": ["eager"]}),
     "benchmark.backend: unknown key; did you mean backends?"),
])
def test_a_malformed_recipe_exits_2_naming_the_key_path(tmp_path, distill_main, edit, want):
    doc = json.loads(json.dumps(BASE))
    edit(doc)
    path = write(tmp_path, doc)
    code, out, err = distill_main("run", path, "--out", tmp_path / "run", "--dry-run")
    if want is None:  # a model that does not exist is found when the stage runs, not here
        assert code == 0, err
        return
    assert code == 2, (out, err)
    assert err.startswith(f"error: {path}: ") and want in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, want", [
    ("teacher: mnist\nteacher: mnist-4step\n", "line 2: key 'teacher' is given twice (first on line 1)"),
    ("teacher: mnist\nstages:\n  - {name: pd, kind: progressive, start_steps: 8, start_steps: 4}\n",
     "line 3: key 'start_steps' is given twice"),
])
def test_a_key_given_twice_is_refused(tmp_path, distill_main, text, want):
    (tmp_path / "r.yaml").write_text(text)
    code, _, err = distill_main("run", tmp_path / "r.yaml", "--out", tmp_path / "run", "--dry-run")
    assert code == 2 and want in err and len(err.strip().splitlines()) == 1, err


def test_overrides_and_the_dry_run_touch_nothing(tmp_path, distill_main):
    path = write(tmp_path, BASE)
    code, out, err = distill_main("run", path, "--out", tmp_path / "run", "--dry-run", "--set",
                                  "stages.pd.round_steps=[5,7]", "--set", "exports.pd-fp32.precision=fp16")
    assert code == 0, err
    assert "round_steps:\n  - 5\n  - 7" in out or "round_steps: [5, 7]" in out, out
    assert "--round-steps 5,7" in out and "distill export onnx" in out and "--precision fp16" in out, out
    assert "(progressive, to run)" in out
    assert not (tmp_path / "run").exists()
    code, _, err = distill_main("run", path, "--dry-run", "--set", "stages.nope.steps=1")
    assert code == 2 and "no entry named nope" in err, err
    code, _, err = distill_main("run", path, "--dry-run", "--set", "steps")
    assert code == 2 and "KEY.PATH=VALUE" in err, err


def test_a_stage_failing_its_own_check_names_the_recipe_key(tmp_path, distill_main):
    """A check only the stage can make (the data against the teacher) names the recipe's key, not a CLI flag."""
    doc = json.loads(json.dumps(BASE))
    doc["stages"][0]["data"] = "digits"
    path = write(tmp_path, doc)
    code, _, err = distill_main("run", path, "--out", tmp_path / "run")
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {path}: stages[0].data: digits: images are 1x8x8"), line
    assert "--" not in line, line


def test_recipe_errors_from_python_name_the_field():
    from distill.app.stages.train import ProgressiveConfig
    from distill.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        ProgressiveConfig.build(teacher="mnist", start_steps=6, target_steps=4)
    assert e.value.field == "start_steps"
    with pytest.raises(ConfigError) as e:
        ProgressiveConfig.build(teacher="mnist", round_steps=[0])
    assert e.value.field == "round_steps"
    cfg = ProgressiveConfig.build(teacher="mnist", start_steps=8, target_steps=2, round_steps="3,4")
    assert cfg.round_steps == [3, 4]
    assert cfg.command("runs/x") == ("distill progressive mnist --out runs/x --start-steps 8 --target-steps 2 "
                                     "--round-steps 3,4")


def test_the_shipped_recipes_validate(distill_main):
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        doc = yaml.safe_load(recipe.read_text())
        if "teacher" not in doc or "stages" not in doc and "exports" not in doc and "benchmark" not in doc:
            continue  # a per-command option file (distill teacher train --config ...)
        code, out, err = distill_main("run", recipe, "--dry-run")
        assert code == 0, (recipe, err)
        assert "# plan:" in out


# -- running: the cache, the gates, cards, the manifest -----------------------------------------------------------


def run_cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, cache_env):
    """digits-ci (made tiny) run once, uninterrupted."""
    out = tmp_path_factory.mktemp("digits") / "run"
    overrides = [a for o in TINY for a in ("--set", o)]
    p = run_cli("run", DIGITS_CI, "--out", out, "--no-progress", *overrides, env=cache_env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, overrides, p


def final_state(out: Path, names=("teacher", "pd", "cd", "pd-fp32")) -> dict:
    """What a run must end with: every model's and graph's content hash, and the benchmark's quality."""
    state = {}
    for name in names:
        record = json.loads((out / name / "stage.json").read_text())
        # an export folder's manifest records when it was made: its graph is the deterministic part
        state[name] = {k: o["sha256"] for k, o in record["outputs"].items() if k != "export"}
    bench = json.loads((out / "bench" / "stage.json").read_text())
    state["quality"] = bench["record"]["quality"]
    return state


def test_digits_ci_runs_end_to_end_and_again_is_a_no_op(digits_run, cache_env):
    out, overrides, first = digits_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"teacher", "pd", "cd", "pd-fp32", "pd-int8", "pd-fused", "bench"}
    assert final_state(out, ("pd-int8", "pd-fused"))  # every stage has its completion record
    assert manifest["machine"]["cpu_flags"] is not None and manifest["versions"]["torch"]
    assert all(s["commands"][0].startswith("distill ") for s in manifest["stages"].values())
    assert (out / "resolved_recipe.yaml").is_file() and (out / "bench" / "report.png").is_file()
    assert (out / "bench" / "report.html").is_file()
    assert (out / "pd" / "steps-2" / "MODEL_CARD.md").is_file() and (out / "pd-int8" / "MODEL_CARD.md").is_file()
    card = (out / "pd" / "steps-2" / "MODEL_CARD.md").read_text()
    assert "progressive distillation" in card and "onnxruntime" in card and manifest["machine"]["cpu"] in card
    gates = json.loads((out / "gates.json").read_text())
    assert gates["passed"] and len(gates["gates"]) == 5
    # the benchmark's ONNX Runtime rows ran the recipe's own exports of pd (not exports of its own)
    ran = {p.resolve() for p in (out / "bench" / "exports").glob("*/*")}
    assert ran == {(out / "pd-fp32").resolve(), (out / "pd-int8").resolve()}, ran
    start = time.perf_counter()
    again = run_cli("run", DIGITS_CI, "--out", out, "--json", *overrides, env=cache_env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout)
    assert {s["status"] for s in summary["stages"].values()} == {"cached"}, summary["stages"]
    assert time.perf_counter() - start < 60
    # a gate that cannot be met: exit 3, one line naming the bound, the value and by how much; nothing reruns
    bad = run_cli("run", DIGITS_CI, "--out", out, *overrides, "--set", "gates.2.max_ratio=0.001", env=cache_env,
                  timeout=300)
    assert bad.returncode == 3, bad.stderr[-2000:]
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("gate ")]
    assert len(lines) == 1 and "fd_ratio <= 0.001" in lines[0] and "missed by" in lines[0], bad.stderr[-2000:]
    assert "running:" not in bad.stderr


# -- the stage API from Python, no CLI ----------------------------------------------------------------------------


def test_the_stage_functions_chain_from_python(tmp_path, monkeypatch):
    from distill.app.gates import QualityGate, check_gate
    from distill.app.stages.bench import BenchConfig, run_bench
    from distill.app.stages.export import ExportConfig, run_export
    from distill.app.stages.train import ProgressiveConfig, TeacherConfig, run_progressive, run_teacher

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    t = run_teacher(TeacherConfig(data="digits", channels=8, channel_mult=[1, 2], num_res_blocks=1, attn=[],
                                  steps=20, batch_size=16, lr=2e-3, warmup=0), tmp_path / "teacher", progress=False)
    teacher = str(t.outputs["model"])
    s = run_progressive(ProgressiveConfig(teacher=teacher, start_steps=4, target_steps=2, round_steps=[4],
                                          batch_size=8), tmp_path / "pd", progress=False)
    student = str(s.outputs["model"])
    e = run_export(ExportConfig(model=student), tmp_path / "export")
    assert e.record["parity"]["max_rel_err"] < 1e-4 and (tmp_path / "export" / "model.onnx").is_file()
    b = run_bench(BenchConfig(models=[{"model": teacher, "samplers": ["ddim"], "steps": [4]}, student],
                              samples=20, batches=[4], repeats=3, max_seconds=0.2, rounds=1), tmp_path / "bench")
    from benchmarks.bench.report import load_table

    result = check_gate(QualityGate(model=student, max_ratio=1000), table=load_table(b.outputs["report_csv"]))
    assert result.passed and result.value > 0
    assert set(b.record["quality"]) and b.record["headline"]["batch"] == 4
