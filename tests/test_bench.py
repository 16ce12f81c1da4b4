"""distill bench on the tiny 8x8 digits teacher: the grid, the speed harness, cached and sharded quality, the joined
report (tables, Pareto plot, HTML), the pick and its exit code, and resuming."""

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from benchmarks.bench import quality as bq
from benchmarks.bench import report as br
from benchmarks.bench import speed as bs
from benchmarks.bench.grid import Config, build_grid, load_grid, numerics
from distill.errors import UsageError


def _grid(model, **kw):
    spec = {"models": [{"model": str(model), "sampler": "ddim", "steps": [1, 2]}], "batches": [2], **kw}
    return build_grid(spec)


# -- the grid ----------------------------------------------------------------------------------------------------


def test_grid_expands_models_steps_and_paths_and_lists_what_it_leaves_out(teacher_file):
    g = _grid(teacher_file, backends=["eager", "onnxruntime"], precisions=["fp32", "bf16", "int8"])
    ids = {c.id[len(str(teacher_file)) + 1:] for c in g.configs}
    assert ids == {f"ddim-{k}/w0/{p}/b2" for k in (1, 2) for p in
                   ("eager-fp32", "eager-bf16", "onnxruntime-fp32", "onnxruntime-int8")}
    assert ("eager-int8", "runs only fp32, bf16, fp16") in g.skipped
    assert ("onnxruntime-bf16", "runs only fp32, fp16, int8") in g.skipped
    # paths: explicit backend-precision pairs; a fused graph is refused past 8 steps
    g = build_grid({"models": [{"model": str(teacher_file), "sampler": "ddim", "steps": [2, 9]}],
                    "paths": ["compile-bf16", "onnxruntime-fused-int8"], "batches": [1, 64]})
    assert {(c.backend, c.precision, c.steps) for c in g.configs} == {
        ("compile", "bf16", 2), ("compile", "bf16", 9), ("onnxruntime-fused", "int8", 2)}
    assert any("unrolls at most 8" in why for _, why in g.skipped)
    assert len(g.groups()) == 2  # one process per model x backend x precision


def test_a_model_entry_may_name_its_own_backends_and_precisions(teacher_file):
    spec = {"models": [{"model": str(teacher_file), "sampler": "ddim", "steps": [2], "backends": ["eager"]},
                       {"model": str(teacher_file), "sampler": "euler", "steps": [2], "paths": ["compile-bf16"]}],
            "backends": ["eager", "onnxruntime"], "precisions": ["fp32", "int8"], "batches": [1]}
    g = build_grid(spec)
    got = {(c.sampler, c.backend, c.precision) for c in g.configs}
    # the first entry keeps the grid's precisions on its own backend (eager-int8 left out as usual)
    assert got == {("ddim", "eager", "fp32"), ("euler", "compile", "bf16")}, got
    with pytest.raises(UsageError, match="model entry .*backend 'tpu'"):
        build_grid({**spec, "models": [{"model": str(teacher_file), "backends": ["tpu"]}]})


def test_a_given_export_is_used_only_for_the_configurations_it_matches(teacher_file, tmp_path):
    from distill.checkpoint import file_sha256

    sha = file_sha256(teacher_file)
    c = Config(str(teacher_file), "ddim", 4, 0.0, "onnxruntime", "int8", 8)
    fused = Config(str(teacher_file), "ddim", 4, 0.0, "onnxruntime-fused", "fp32", 8)
    m = {"source": {"sha256": sha}, "precision": "int8", "kind": "denoiser", "guided": False, "target": "cpu"}
    assert bs.export_matches(m, c, sha)
    assert not bs.export_matches(m, c, "0" * 64)  # another model file
    assert not bs.export_matches({**m, "precision": "fp32"}, c, sha)
    assert not bs.export_matches({**m, "target": "tensorrt"}, c, sha)  # INT8 ranges for another backend
    assert not bs.export_matches(m, dataclasses.replace(c, guidance=1.5), sha)  # guided, but no w input
    sampler = {**m, "precision": "fp32", "kind": "sampler", "sampler": "ddim", "steps": 4, "target": "any"}
    assert bs.export_matches(sampler, fused, sha) and not bs.export_matches({**sampler, "steps": 2}, fused, sha)
    with pytest.raises(UsageError, match="--use-exports .*not an export folder"):
        bs.adopt_exports([c], tmp_path / "exports", [tmp_path])


def test_configurations_with_the_same_numerics_share_one_quality_measurement(teacher_file):
    assert numerics("eager", "fp32") == numerics("onnxruntime", "fp32") == numerics("onnxruntime-fused", "fp32")
    assert numerics("eager", "bf16") == numerics("compile", "bf16") != numerics("onnxruntime", "fp16")
    assert numerics("onnxruntime", "int8") != numerics("onnxruntime-fused", "int8")  # per-step ranges differ
    g = _grid(teacher_file, backends=["eager", "compile", "onnxruntime"], precisions=["fp32", "bf16"])
    q = g.quality_configs()
    assert len(q) == 4  # (fp32, torch-bf16) x 2 step counts; batch sizes never split quality
    assert {c.backend for c in q if c.precision == "fp32"} == {"onnxruntime"}  # the fastest exact path
    assert {c.backend for c in q if c.precision == "bf16"} == {"compile"}


@pytest.mark.parametrize("spec, message", [
    ({}, "needs a non-empty 'models' list"),
    ({"models": ["m"], "colour": 1}, "unknown key(s) colour"),
    ({"models": ["m"], "backends": ["tensorflow"]}, "backend 'tensorflow'"),
    ({"models": ["m"], "paths": ["eager-fp64"]}, "write BACKEND-PRECISION"),
    ({"models": ["m"], "paths": ["eager-fp32"], "backends": ["eager"]}, "either paths"),
    ({"models": [{"model": "m", "sampler": "magic"}]}, "sampler 'magic'"),
    ({"models": [{"model": "m", "steps": 0}]}, "steps must be at least 1"),
    ({"models": ["m"], "batches": [0]}, "batch sizes must be at least 1"),
    ({"models": ["m"], "paths": ["eager-int8"]}, "no runnable configuration"),
])
def test_bad_grids_are_refused_with_one_line(teacher_file, spec, message):
    spec = json.loads(json.dumps(spec).replace('"m"', json.dumps(str(teacher_file))))
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_grid(spec)


def test_the_shipped_grid_loads_and_a_missing_grid_names_the_shipped_ones(tmp_path):
    g = load_grid("mnist-cpu")
    models = {c.model for c in g.configs}
    assert {"mnist", "mnist-4step", "mnist-1step", "mnist-4step-guided", "mnist-cd"} <= models
    assert any(c.backend == "eager" and c.precision == "fp32" and c.batch == 64 for c in g.configs)
    with pytest.raises(UsageError, match="shipped: mnist-cpu"):
        load_grid(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("models: [\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_grid(tmp_path / "bad.yaml")


# -- the speed harness -------------------------------------------------------------------------------------------


def test_time_calls_reports_order_statistics_and_stops_slow_calls_early():
    import time

    r = bs.time_calls(lambda: time.sleep(0.002), repeats=7, warmup=1)
    assert r["repeats"] == 7 and 2.0 <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    r = bs.time_calls(lambda: time.sleep(0.02), repeats=1000, warmup=0, max_seconds=0.05, min_repeats=3)
    assert 3 <= r["repeats"] < 10
    assert bs.harness_overhead_ms() < 0.01  # timing an empty call: microseconds, not milliseconds


def test_peak_memory_counts_from_the_reset():
    import mmap
    from pathlib import Path

    def rss_mb() -> float:  # what the process holds now (the peak is never below it)
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(ln.split()[1] for ln in status if ln.startswith("VmRSS:"))) / 1024

    block = mmap.mmap(-1, 64 * 2**20)  # 64 MiB of fresh pages (an array could reuse memory already resident)
    bs.reset_peak_memory("cpu")
    before = rss_mb()  # not the peak at the reset: another thread may free memory meanwhile
    for offset in range(0, len(block), 4096):  # touched page by page (no 64 MiB temporary beside it)
        block[offset] = 1
    grown = bs.peak_memory("cpu")["peak_rss_mb"]
    block.close()
    assert grown - before > 50
    bs.reset_peak_memory("cpu")
    assert bs.peak_memory("cpu")["peak_rss_mb"] < grown - 50  # the window starts again


def test_machine_info_names_the_cpu_threads_and_libraries():
    m = bs.machine_info()
    assert m["cpu"] and m["threads"] >= 1 and "torch" in m["libraries"] and "onnxruntime" in m["libraries"]
    assert isinstance(m["cpu_flags"], list)


def test_speed_measures_each_configuration_in_passes_and_a_rerun_resumes(teacher_file, tmp_path, monkeypatch):
    calls = []

    def in_process(fn, *args):
        calls.append(f"{fn.__name__} {args[0][0].backend}")
        return fn(*args)

    monkeypatch.setattr(bs, "isolated", in_process)
    # eager at 1 and 2 steps, a fused graph (one export) at 1
    grid = build_grid({"models": [{"model": str(teacher_file), "sampler": "ddim", "steps": [1, 2]},
                                  {"model": str(teacher_file), "sampler": "ddim", "steps": [1],
                                   "backends": ["onnxruntime-fused"]}], "batches": [2]})
    rows = bs.run_speed(grid, tmp_path, repeats=4, max_seconds=0.2, rounds=2, log=lambda m: None)
    assert [r["config"] for r in rows] == [c.id for c in grid.configs]
    for r in rows:
        assert r["sample_p10_ms"] <= r["sample_ms"] <= r["sample_p90_ms"] and r["peak_rss_mb"] > 0
        assert r["images_per_s"] == pytest.approx(2 / r["sample_ms"] * 1000)
        assert r["machine"]["cpu"] and r["kind"] == "teacher" and r["command"].startswith("distill bench speed")
        assert r["rounds"] == 2 and len(r["sample_round_ms"]) == 2 and r["sample_repeats"] >= 2
        assert "sample_times_ms" not in r
        if r["backend"] == "eager":
            assert r["eval_p10_ms"] <= r["eval_ms"] <= r["eval_p90_ms"]
            assert r["sample_ms"] > r["eval_ms"] * 0.5 * r["steps"]  # a whole sample is its steps' evaluations
        else:
            assert "eval_ms" not in r  # a fused graph has no per-step call
    two = [r for r in rows if r["backend"] == "eager" and r["steps"] == 2][0]
    one = [r for r in rows if r["backend"] == "eager" and r["steps"] == 1][0]
    assert two["eval_ms"] == one["eval_ms"]  # one evaluation measured once per batch size and pass
    # per model x backend x precision: the exports once in a process of their own, then one measuring process per
    # pass, the second pass in reverse group order
    assert calls == ["measure_group eager", "make_exports onnxruntime-fused", "measure_group onnxruntime-fused",
                     "measure_group onnxruntime-fused", "measure_group eager"]
    passes = bs.read_jsonl(tmp_path / "speed_rounds.jsonl")
    assert sorted((p["config"], p["round"]) for p in passes) == sorted((c.id, k) for c in grid.configs for k in (0, 1))
    # the pooled statistics are those of the passes' calls together
    first = [p for p in passes if p["config"] == one["config"]]
    pooled = bs.summarize([t for p in first for t in p["sample_times_ms"]])
    assert one["sample_ms"] == pytest.approx(pooled["median_ms"]) and one["sample_repeats"] == pooled["repeats"]
    # the exports are kept, keyed by the model's content hash; a re-run measures nothing
    assert len(list((tmp_path / "exports").glob("*/fused-ddim-*-fp32/manifest.json"))) == 1
    again = bs.run_speed(grid, tmp_path, repeats=4, max_seconds=0.2, rounds=2, log=lambda m: None)
    assert len(calls) == 5 and [r["sample_ms"] for r in again] == [r["sample_ms"] for r in rows]
    # a line cut off by a kill is skipped and measured again
    with open(tmp_path / "speed.jsonl", "a") as f:
        f.write('{"config": "cut')
    assert len(bs.read_jsonl(tmp_path / "speed.jsonl")) == len(rows)


def test_speed_resumes_a_killed_run_from_its_finished_passes(teacher_file, tmp_path, monkeypatch):
    calls = []

    def in_process(fn, *args):
        calls.append(fn.__name__)
        return fn(*args)

    monkeypatch.setattr(bs, "isolated", in_process)
    grid = _grid(teacher_file, backends=["eager"], precisions=["fp32"])
    first = bs.run_speed(grid, tmp_path, repeats=3, max_seconds=0.1, rounds=1, log=lambda m: None)
    # killed after the passes were written, before the rows: the rows are made from the passes, nothing measured
    (tmp_path / "speed.jsonl").unlink()
    again = bs.run_speed(grid, tmp_path, repeats=3, max_seconds=0.1, rounds=1, log=lambda m: None)
    assert calls == ["measure_group"] and [r["sample_ms"] for r in again] == [r["sample_ms"] for r in first]
    # asked for a second pass, only the second pass is measured, and the rows pool both
    (tmp_path / "speed.jsonl").unlink()
    both = bs.run_speed(grid, tmp_path, repeats=3, max_seconds=0.1, rounds=2, log=lambda m: None)
    assert calls == ["measure_group"] * 2 and all(r["rounds"] == 2 for r in both)


# -- quality -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, count", [(10, 3), (2, 4), (7, 1)])
def test_shards_cover_every_seed_once_in_order(n, count):
    bounds = [bq.shard_bounds(n, i, count) for i in range(count)]
    covered = [s for lo, hi in bounds for s in range(lo, hi)]
    assert covered == list(range(n))


def test_sharded_generation_equals_one_process_and_samples_are_cached(teacher_file, tmp_path, monkeypatch):
    c = Config(str(teacher_file), "ddim", 2, 0.0, "eager", "fp32", 2)
    seeds = list(range(9))
    one = bq.generate_samples(c, seeds, tmp_path / "one", tmp_path / "exports", "cpu", batch_size=4)
    # two processes, run one after the other: shard 1 writes its part, shard 0 writes its part and joins
    assert bq.generate_samples(c, seeds, tmp_path / "two", tmp_path / "exports", "cpu", 3, index=1, count=2) is None
    two = bq.generate_samples(c, seeds, tmp_path / "two", tmp_path / "exports", "cpu", 5, index=0, count=2)
    a, b = np.load(one), np.load(two)
    assert (a["seeds"] == b["seeds"]).all() and list(a["seeds"]) == seeds
    assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1  # float rounding across batches
    assert (a["labels"] == b["labels"]).all()
    assert not list((tmp_path / "two" / "samples").glob("*shard*"))
    monkeypatch.setattr(bq, "draw", lambda *a, **k: pytest.fail("cached samples were drawn again"))
    assert bq.generate_samples(c, seeds, tmp_path / "one", tmp_path / "exports", "cpu", batch_size=4) == one


def test_quality_measures_each_numerics_class_once_and_reuses_results(teacher_file, tmp_path, monkeypatch):
    grid = _grid(teacher_file, backends=["eager", "onnxruntime"], precisions=["fp32"])
    rows = bq.run_quality(grid, tmp_path, samples=40, data_spec="digits", metrics=("fd", "acc"),
                          log=lambda m: None)
    assert len(rows) == 2 and {r["steps"] for r in rows} == {1, 2}
    assert all(r["n_fake"] == 40 and r["fd"] > 0 and 0 <= r["acc"] <= 1 for r in rows)
    assert all(r["quality_from"].endswith("onnxruntime-fp32") for r in rows)
    monkeypatch.setattr(bq, "draw", lambda *a, **k: pytest.fail("re-run sampled again"))
    again = bq.run_quality(grid, tmp_path, samples=40, data_spec="digits", metrics=("fd", "acc"),
                           log=lambda m: None)
    assert [r["fd"] for r in again] == [r["fd"] for r in rows]
    # another metric is computed from the cached samples, without sampling
    more = bq.run_quality(grid, tmp_path, samples=40, data_spec="digits", metrics=("fd", "kid"), log=lambda m: None)
    assert all("kid" in r for r in more) and [r["fd"] for r in more] == [r["fd"] for r in rows]


# -- report and pick ---------------------------------------------------------------------------------------------


def _table():
    rows = []
    for model, kind, steps, fd in (("t", "teacher", 20, 0.10), ("t", "teacher", 8, 0.30), ("s", "student", 4, 0.14),
                                   ("s1", "student", 1, 0.60)):
        for backend, precision, speedup in (("eager", "fp32", 1.0), ("onnxruntime", "int8", 2.0)):
            for batch in (1, 64):
                ips = speedup * batch * 100 / steps
                rows.append({"config": f"{model}/ddim-{steps}/w0/{backend}-{precision}/b{batch}", "kind": kind,
                             "model": model, "sampler": "ddim", "steps": steps, "guidance": 0.0, "backend": backend,
                             "precision": precision, "batch": batch, "images_per_s": ips,
                             "sample_ms": batch / ips * 1000, "fd": fd * (1.05 if precision == "int8" else 1.0)})
    df = pd.DataFrame(rows)
    for col in br.TABLE_COLUMNS:
        if col not in df:
            df[col] = np.nan
    return br.annotate(df)


def test_pareto_frontier_pick_and_headline_on_a_known_table():
    df = _table()
    b64 = df[df["batch"] == 64]
    front = set(b64[b64["pareto"]]["config"])
    # dominated: anything both slower and worse than another point
    assert "t/ddim-20/w0/eager-fp32/b64" in front and "s1/ddim-1/w0/onnxruntime-int8/b64" in front
    assert "t/ddim-8/w0/eager-fp32/b64" not in front  # s at 4 steps is faster and better
    assert df["fd_ratio"].min() == pytest.approx(1.0)
    p = br.pick(df, 64, max_ratio=1.5)
    assert p["config"] == "s/ddim-4/w0/onnxruntime-int8/b64"  # 0.147 <= 0.15, the fastest within the bound
    assert br.pick(df, 64, max_fd=0.01) is None
    assert br.pick(df, 64, max_ratio=1.5, students_only=True)["model"] == "s"
    h = br.headline(df, batch=64, bound=1.5, goal=10)
    assert h["baseline"]["config"] == "t/ddim-20/w0/eager-fp32/b64"
    assert h["student"]["speedup"] == pytest.approx(10.0) and h["met"]
    assert h["fastest_student"]["config"].startswith("s1/")


def test_stability_compares_the_medians_of_two_runs():
    df = _table()
    other = df.copy()
    other["sample_ms"] = other["sample_ms"] * np.where(other["batch"] == 1, 1.05, 1.2)
    s = br.stability(df, other)
    assert s["configs"] == len(df) and s["within_10pct"] == pytest.approx(0.5)
    assert s["max_abs_diff"] == pytest.approx(0.2)
    assert s["passes_median_spread"] is None  # rows without passes
    df["round_spread"] = np.linspace(0.0, 0.4, len(df))  # build_table's max / min - 1 of the passes' medians
    assert br.stability(df, other)["passes_median_spread"] == pytest.approx(0.2)


def test_cli_speed_quality_report_and_pick_end_to_end(teacher_file, tmp_path, distill_main):
    out = tmp_path / "bench"
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"models": [{"model": str(teacher_file), "sampler": "ddim", "steps": [1, 3]}],
                                    "paths": ["eager-fp32"], "batches": [2]}))
    r = distill_main("bench", "speed", "--grid", grid, "--out", out, "--repeats", "3", "--max-seconds", "0.2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("images/s") == 2
    r = distill_main("bench", "quality", "--grid", grid, "--out", out, "--samples", "40", "--metrics", "fd,acc")
    assert r.returncode == 0, r.stderr
    r = distill_main("bench", "report", out, "--dest", tmp_path / "rep", "--name", "r", "--batch", "2",
                     "--compare", out)
    assert r.returncode == 0, r.stderr
    for ext in ("csv", "parquet", "md", "json", "png", "html"):
        assert (tmp_path / "rep" / f"r.{ext}").stat().st_size > 0
    csv, parquet = pd.read_csv(tmp_path / "rep" / "r.csv"), pd.read_parquet(tmp_path / "rep" / "r.parquet")
    assert len(csv) == len(parquet) == 2 and csv["fd"].notna().all() and csv["pareto"].any()
    md = (tmp_path / "rep" / "r.md").read_text()
    assert "## Headline" in md and "Pareto frontier at batch 2" in md and "within 10 % for 100 %" in md
    html = (tmp_path / "rep" / "r.html").read_text()
    assert "measure speed" in html and "distill bench speed" in html and "<script" in html
    assert "cdn.bokeh.org" not in html  # self-contained: opens offline
    head = json.loads((tmp_path / "rep" / "r.json").read_text())["headline"]
    assert head["baseline"]["config"].endswith("eager-fp32/b2")
    # pick: the fastest within the bound, JSON or text; exit 3 when nothing meets it; 2 without a bound
    r = distill_main("bench", "pick", out, "--batch", "2", "--max-ratio", "1000", "--json")
    assert r.returncode == 0, r.stderr
    picked = json.loads(r.stdout)
    fastest = csv.loc[csv["images_per_s"].idxmax()]  # both meet the bound (1 step is usually, not surely, faster)
    assert picked["config"] == fastest["config"] and picked["speed_command"].startswith("distill bench speed")
    r = distill_main("bench", "pick", tmp_path / "rep" / "r.csv", "--batch", "2", "--max-fd", "0")
    assert r.returncode == 3 and "nothing in" in r.stderr and "FD <= 0" in r.stderr
    r = distill_main("bench", "pick", out, "--batch", "2")
    assert r.returncode == 2 and "--max-fd, --max-fid or --max-ratio" in r.stderr
    r = distill_main("bench", "pick", out, "--batch", "5", "--max-fd", "1")
    assert r.returncode == 2 and "batch sizes 2" in r.stderr
    r = distill_main("bench", "pick", out, "--batch", "2", "--max-fid", "10")
    assert r.returncode == 2 and "has no FID" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["speed"], "pass --grid FILE"),
    (["speed", "--grid", "mnist-cpu", "--models", "mnist"], "drop one"),
    (["speed", "--models", "mnist", "--backends", "tflite"], "--backends: unknown tflite"),
    (["speed", "--models", "mnist", "--batches", "0"], "--batches"),
    (["speed", "--models", "no-such-model"], "no-such-model: no such checkpoint"),
    (["quality", "--models", "mnist", "--metrics", "psnr"], "--metrics: unknown psnr"),
    (["report", "/nonexistent-bench"], "does not exist"),
])
def test_bench_usage_errors_are_one_line(distill_main, args, message):
    r = distill_main("bench", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_report_of_an_empty_folder_says_what_to_run(tmp_path, distill_main):
    r = distill_main("bench", "report", tmp_path)
    assert r.returncode == 2 and "run distill bench speed" in r.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (apt-get install chromium)")
def test_the_html_report_renders_in_headless_chromium(tmp_path):
    from benchmarks.bench.screenshot import screenshot

    df = _table()
    br.plot_html(df, tmp_path / "r.html", "test", 1.5)
    png = screenshot(tmp_path / "r.html", tmp_path / "r.png", size=(900, 700))
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == (700, 900)
    # the plot drew: more than a blank page (markers in several colours)
    colours = {tuple(p) for p in img.reshape(-1, 3)[::7]}
    assert len(colours) > 50


def test_quality_sharded_by_accelerate_launch_matches_one_process(teacher_file, tmp_path, distill_main):
    """Two processes under ``accelerate launch`` (joined over gloo on a CPU) draw half the seeds each; the joined
    samples and the metrics equal one process's."""
    import os
    import subprocess
    import sys

    args = ["bench", "quality", "--models", str(teacher_file), "--samplers", "ddim", "--steps", "2", "--samples",
            "30", "--metrics", "fd,acc", "--data", "digits", "--batch-size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = distill_main(*args, "--out", tmp_path / "one")  # one process: this one
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--num_cpu_threads_per_process", "1", "-m", "distill.cli", *args, "--out",
                          str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    q1 = bs.read_jsonl(tmp_path / "one" / "quality.jsonl")
    q2 = bs.read_jsonl(tmp_path / "two" / "quality.jsonl")
    assert len(q1) == len(q2) == 1 and q2[0]["processes"] == 2 and q1[0]["processes"] == 1
    a, b = np.load(q1[0]["samples_file"]), np.load(q2[0]["samples_file"])
    assert list(b["seeds"]) == list(range(30))
    assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1
    assert (a["labels"] == b["labels"]).all()
    assert q2[0]["fd"] == pytest.approx(q1[0]["fd"], rel=1e-3)
