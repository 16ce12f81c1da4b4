"""``distill bench speed``: latency of every grid configuration, each backend in its own process.

Per configuration (model × sampler/steps × backend × precision × batch): the whole sample (all steps, from noise to
image) and one network evaluation, each as median, p10 and p90 of timed calls after warm-up (CUDA events on a GPU,
``time.perf_counter`` on a CPU), images/s from the whole-sample median, and the peak memory (the process's peak RSS;
on a GPU also the peak allocated GPU memory), counted from loading the backend (exports are made beforehand in a
process of their own). Every row carries the machine (:func:`machine_info`).

The configurations of one model × backend × precision run in one fresh spawned process: the backend is loaded (and
compiled or exported) once, and no idle thread pool of an earlier backend (ONNX Runtime's spinning threads,
OpenMP's, inductor's workers) competes with the one measured.

The grid is measured in ``rounds`` passes (the group order reversed on every other pass), each pass taking its share
of the timed calls, and a configuration's statistics pool the calls of every pass. A shared or virtual machine is
slow in bursts that last seconds to minutes; timed back to back, a configuration that falls in one is slow as a
whole, while spread over passes minutes apart, a burst touches a minority of its calls and moves the median little.
Each finished pass of a process is appended to ``speed_rounds.jsonl`` and a configuration's row to ``speed.jsonl``
once all its passes are in; a re-run skips what is there (``--force`` measures everything again).
"""


from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench.grid import Config, Grid, model_digest, model_sha256
from distill.errors import UsageError
from distill.hardware import cpu_info
from distill.latent import decode_latents, latent_of

LOG = logging.getLogger("distill")  # progress lines: the CLI prints them, a library caller configures logging


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """The machine a result was measured on: CPU model and the flags that pick kernels, threads
    (:func:`distill.hardware.cpu_info`), GPU and driver, library versions."""
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for lib in ("distill", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "tensorrt"):
        try:
            libs[lib] = version(lib)
        except PackageNotFoundError:
            pass
    info = {**cpu_info(), "os": platform.platform(), "python": platform.python_version(), "libraries": libs,
            "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update({"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
                     "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                     "driver": _nvidia_driver()})
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def timed_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 2, max_seconds: float | None = None,
                min_repeats: int = 3, device: str = "cpu") -> list[float]:
    """The times (ms) of up to ``repeats`` calls of ``fn`` after ``warmup`` untimed ones. ``max_seconds`` stops
    early (after at least ``min_repeats``) for slow calls. On a GPU each call is timed by CUDA events."""
    for _ in range(warmup):
        fn()
    cuda = device.startswith("cuda")
    times: list[float] = []
    budget_start = time.perf_counter()
    while len(times) < repeats:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        if max_seconds is not None and len(times) >= min_repeats and time.perf_counter() - budget_start > max_seconds:
            break
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median, p10 and p90 (ms) of timed calls, and how many."""
    ms = np.asarray(times)
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "repeats": len(times)}


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 2, max_seconds: float | None = None,
               min_repeats: int = 3, device: str = "cpu") -> dict[str, float]:
    """:func:`summarize` of :func:`timed_calls`."""
    return summarize(timed_calls(fn, repeats=repeats, warmup=warmup, max_seconds=max_seconds,
                                 min_repeats=min_repeats, device=device))


def harness_overhead_ms(device: str = "cpu") -> float:
    """What :func:`time_calls` adds to one measured call: the median of timing an empty call."""
    return time_calls(lambda: None, repeats=2000, warmup=10, device=device)["median_ms"]


def reset_peak_memory(device: str) -> None:
    """Start the peak-memory window: Linux resets the process's RSS high-water mark (``VmHWM``) when 5 is written
    to ``/proc/self/clear_refs``; on a GPU, torch's peak counter."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak counts from the process's start
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict[str, float]:
    """Peak RSS since :func:`reset_peak_memory` (MiB; the lifetime peak where the kernel cannot reset it), and on a
    GPU the peak allocated GPU memory."""
    try:
        status = Path("/proc/self/status").read_text()
        kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    except (OSError, StopIteration, ValueError):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    out = {"peak_rss_mb": round(kib / 1024, 1)}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def export_folder(model: str, backend: str, precision: str, sampler: str, steps: int, exports: Path) -> Path | None:
    """Where the ONNX export of an ONNX Runtime configuration is kept (under ``exports``, keyed by the model's
    content hash); ``None`` for torch backends."""
    if backend not in ("onnxruntime", "onnxruntime-fused"):
        return None
    name = Path(model).stem if Path(model).suffix else Path(model).name
    kind = f"fused-{sampler}-{steps}-{precision}" if backend == "onnxruntime-fused" else precision
    return exports / f"{name}-{model_digest(model)}" / kind


def is_exported(c: Config, exports: Path) -> bool:
    from export.artifact import is_artifact

    folder = export_folder(c.model, c.backend, c.precision, c.sampler, c.steps, exports)
    return folder is None or is_artifact(folder)


def export_for(model: str, backend: str, precision: str, sampler: str, steps: int, guidance: float,
               exports: Path) -> Path | None:
    """The ONNX export an ONNX Runtime configuration runs (made once, see :func:`export_folder`); ``None`` for
    torch backends."""
    from export.artifact import is_artifact
    from export.onnx import ExportOptions, export_onnx

    folder = export_folder(model, backend, precision, sampler, steps, exports)
    if folder is None:
        return None
    if not is_artifact(folder):
        fused = backend == "onnxruntime-fused"
        opts = ExportOptions(precision=precision, fused=fused, sampler=sampler if fused else None,
                             steps=steps if fused else None, guided=True if guidance else None)
        export_onnx(model, folder, opts, command="distill bench", log=lambda *a: None)
    return folder


def export_matches(manifest: dict, c: Config, sha256: str) -> bool:
    """Whether the ONNX export with ``manifest`` is the graph configuration ``c`` runs: the same model file, the
    precision, the per-step graph (onnxruntime) or a fused sampler of ``c``'s sampler and steps
    (onnxruntime-fused), a w input where ``c`` guides, and INT8 ranges meant for the backend the benchmark uses."""
    from export.precision import Int8Options

    if manifest.get("source", {}).get("sha256") != sha256 or manifest.get("precision") != c.precision:
        return False
    if c.backend == "onnxruntime-fused":
        shape = manifest.get("kind") == "sampler" and (manifest.get("sampler"), manifest.get("steps")) == (c.sampler,
                                                                                                         c.steps)
    else:
        shape = manifest.get("kind") == "denoiser"
    return shape and not (c.guidance and not manifest.get("guided")) and \
        manifest.get("target", "any") in ("any", Int8Options().target)


def adopt_exports(configs: list[Config], exports: Path, folders: list[str | Path]) -> list[str]:
    """Run the given ONNX exports (a recipe's, made with its own options) for the configurations they match
    instead of exporting again: each is linked where :func:`export_folder` looks. Returns one line per adoption."""
    from export.artifact import is_artifact

    found = []
    for f in map(Path, folders):
        manifest = json.loads((f / "manifest.json").read_text()) if (f / "manifest.json").is_file() else None
        if manifest is None or not is_artifact(f):
            raise UsageError(f"--use-exports {f}: not an export folder; pass folders made by distill export onnx")
        found.append((f, manifest))
    lines = []
    for c in configs:
        dest = export_folder(c.model, c.backend, c.precision, c.sampler, c.steps, exports)
        if dest is None:
            continue
        match = next((f for f, m in found if export_matches(m, c, model_sha256(c.model))), None)
        if match is None or (dest.is_symlink() and dest.resolve() == match.resolve()):
            continue
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        elif dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(os.path.relpath(match.resolve(), dest.parent.resolve()), target_is_directory=True)
        lines.append(f"{c.backend}-{c.precision} of {c.model}: runs the export {match}")
    return lines


def make_exports(configs: list[Config], exports: str) -> None:
    """The ONNX exports ``configs`` run, made where missing."""
    for c in configs:
        export_for(c.model, c.backend, c.precision, c.sampler, c.steps, c.guidance, Path(exports))


def open_backend(config: Config, exports: Path, device: str, threads: int | None = None):
    """The backend a configuration runs, loaded (an ONNX Runtime configuration's export made first if needed)."""
    from export.backends import load_backend

    folder = export_for(config.model, config.backend, config.precision, config.sampler, config.steps,
                        config.guidance, exports)
    if folder is None:
        return load_backend(config.model, config.backend, precision=config.precision, device=device)
    return load_backend(folder, "onnxruntime", device=device, threads=threads)


def measure_group(configs: list[Config], exports: str, device: str, threads: int, repeats: int,
                  max_seconds: float, min_repeats: int = 3) -> list[dict]:
    """One pass over the configurations of one model × backend × precision (run in a fresh process): per
    configuration its static facts and the raw times (ms) of its timed calls, ``sample_times_ms`` and (but for
    fused graphs, one call per sample) ``eval_times_ms``. Fused configurations (one graph per sampler and step
    count) each load their own graph."""
    from distill.denoiser import Cond
    from distill.samplers import nfe

    torch.set_num_threads(threads)
    timing = {"repeats": repeats, "max_seconds": max_seconds, "min_repeats": min_repeats, "device": device}
    rows = []
    loaded: dict[tuple, Any] = {}
    evals: dict[int, dict] = {}  # one network evaluation per batch size: the same for every sampler and step count
    for c in configs:
        key = (c.sampler, c.steps, c.guidance) if c.backend == "onnxruntime-fused" else ()
        if key not in loaded:
            loaded.clear()
            gc.collect()
            reset_peak_memory(device)  # the peak counts loading and running this backend
            start = time.perf_counter()
            loaded[key] = (open_backend(c, Path(exports), device, threads), time.perf_counter() - start)
        f, load_s = loaded[key]
        fused = getattr(f, "kind", "denoiser") == "sampler"
        seeds = list(range(c.batch))
        labels = torch.arange(c.batch, device=device) % f.num_classes if f.num_classes else None
        cond = Cond(labels, c.guidance)
        method = (f.metadata.get("card") or {}).get("method")
        row = {**c.as_row(), "quality_id": c.quality_id, "kind": "student" if method else "teacher",
               "method": method, "nfe": nfe(c.sampler, c.steps, f.schedule), "load_s": round(load_s, 2),
               "command": c.command("speed")}
        if not fused and c.batch not in evals:
            evals[c.batch] = _time_eval(f, c.batch, cond, timing)
        row.update(evals.get(c.batch, {}) if not fused else {})
        row["sample_times_ms"] = timed_calls(_sample_call(f, c, seeds, cond, device), warmup=1, **timing)
        if latent_of(f) and not getattr(f, "decodes_itself", False):
            # a latent model's decode, alone (the whole sample above includes it): at few steps it can dominate
            z = torch.randn((c.batch, *f.image_shape), generator=torch.Generator().manual_seed(0)).to(device)
            row["decode_times_ms"] = timed_calls(lambda z=z, f=f: decode_latents(f, z), warmup=1, **timing)
        row.update(peak_memory(device))
        rows.append(row)
    return rows


def _time_eval(f, batch: int, cond, timing: dict) -> dict:
    """One network evaluation at ``batch``, after a first (compiling) call."""
    device = timing["device"]
    x = torch.randn((batch, *f.image_shape), generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((batch,), 0.5, device=device)
    start = time.perf_counter()
    f(x, t, cond)  # the first call at this batch size: compiles where the backend compiles
    first = time.perf_counter() - start
    return {"eval_times_ms": timed_calls(lambda: f(x, t, cond), **timing), "first_call_s": round(first, 2)}


def pooled_row(passes: list[dict]) -> dict:
    """A configuration's row from its passes: median, p10 and p90 over the timed calls of all passes, each
    pass's median (``*_round_ms``), images/s from the pooled whole-sample median, the highest peak memory."""
    row = {k: v for k, v in passes[0].items() if not k.endswith("_times_ms") and k not in ("round", "first_call_s")}
    for what in ("sample", "eval", "decode"):
        if f"{what}_times_ms" not in passes[0]:
            continue
        s = summarize([t for p in passes for t in p[f"{what}_times_ms"]])
        row.update({f"{what}_ms": s["median_ms"], f"{what}_p10_ms": s["p10_ms"], f"{what}_p90_ms": s["p90_ms"],
                    f"{what}_repeats": s["repeats"],
                    f"{what}_round_ms": [float(np.median(p[f"{what}_times_ms"])) for p in passes]})
    row["repeats"] = row["sample_repeats"]
    row["rounds"] = len(passes)
    row["images_per_s"] = row["batch"] / row["sample_ms"] * 1000
    row["first_call_s"] = passes[0].get("first_call_s")
    for k in ("peak_rss_mb", "peak_gpu_mb", "load_s"):
        if k in passes[0]:
            row[k] = max(p[k] for p in passes)
    return row


def _sample_call(f, c: Config, seeds: list[int], cond, device: str) -> Callable[[], Any]:
    """A whole sample of ``c``: the sampler loop over the denoiser, or the fused graph's one call; then, for a
    latent model, the decode to images (inside a fused graph that includes it)."""
    if getattr(f, "kind", "denoiser") == "sampler":
        return lambda: decode_latents(f, f.sample(seeds, cond))
    from distill.checkpoint import card_sampling
    from distill.samplers import generate

    _, _, spacing, timesteps = card_sampling(f.metadata, c.sampler, c.steps)
    return lambda: decode_latents(f, generate(f, f.image_shape, seeds, sampler=c.sampler, steps=c.steps,
                                              spacing=spacing, cond=cond, device=device, timesteps=timesteps))


def _with_environment(env: dict[str, str], fn, *args):
    os.environ.clear()
    os.environ.update(env)
    return fn(*args)


DIFFUSERS_UNET = "diffusers.models.unets.unet_2d"


def isolated(fn, *args):
    """``fn(*args)`` in a fresh process (see the module's note), with this process's environment as it is now.

    The process is forked from a server process that imported torch and this module once and never ran an
    operation (so it holds no thread pool to inherit): a fresh process costs milliseconds, not the seconds of
    starting an interpreter and importing torch (about 3 s on a 2-core machine, once per group and pass)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver")
    preload = ["benchmarks.bench.speed"]
    if DIFFUSERS_UNET in sys.modules:  # a diffusers model is being measured: its import (~3 s) once, in the server
        preload.append(DIFFUSERS_UNET)
    ctx.set_forkserver_preload(preload)
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_with_environment, dict(os.environ), fn, *args).result()


RECORD_SUM = "sha256"  # each benchmark record's checksum: of its JSON (sorted keys) without this field


def record_sum(row: dict) -> str:
    body = {k: v for k, v in row.items() if k != RECORD_SUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """A results file's records. A record that is not whole (a line cut off by a kill), fails its checksum (edited
    or damaged on disk), has none, or lacks a ``required`` key is left out with a note, so it is measured again;
    results never mix a damaged record in."""
    if not path.is_file():
        return []
    rows, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a kill: measured again
            dropped += 1
            continue
        if (not isinstance(row, dict) or row.get(RECORD_SUM) != record_sum(row)
                or any(k not in row for k in required)):
            dropped += 1
            continue
        rows.append({k: v for k, v in row.items() if k != RECORD_SUM})
    if dropped:
        LOG.warning(f"{path}: {dropped} record(s) cut off, damaged or without a checksum left out (measured again "
                    "where a command needs them)")
    return rows


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows, each line written whole (with its checksum) and flushed, so a kill loses at most the group in
    flight."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({**r, RECORD_SUM: record_sum(r)}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_speed(grid: Grid, out: Path, *, device: str = "cpu", threads: int | None = None, repeats: int = 20,
              max_seconds: float = 20.0, rounds: int = 3, force: bool = False, exports: Path | None = None,
              log: Callable[[str], None] = LOG.info) -> list[dict]:
    """Measure every configuration of ``grid`` not yet in ``out/speed.jsonl`` in ``rounds`` passes over the grid
    (see the module's note), ``repeats`` timed calls and ``max_seconds`` per measurement shared among the passes;
    returns all rows for the grid."""
    threads = threads or torch.get_num_threads()
    path, passes_path = out / "speed.jsonl", out / "speed_rounds.jsonl"
    exports = exports or out / "exports"
    done = {r["config"]: r for r in read_jsonl(path, ("config",))} if not force else {}
    passes: dict[str, dict[int, dict]] = {}
    for r in read_jsonl(passes_path, ("config", "round")) if not force else []:
        passes.setdefault(r["config"], {})[r["round"]] = r
    machine = machine_info(device)
    overhead = harness_overhead_ms(device)
    per_pass = {"repeats": -(-repeats // rounds), "max_seconds": max_seconds / rounds,
                "min_repeats": -(-3 // rounds)}  # at least 3 calls in all
    todo = {g: [c for c in cs if c.id not in done] for g, cs in grid.groups().items()}
    todo = {g: cs for g, cs in todo.items() if cs}
    total = sum(len(cs) for cs in todo.values())
    log(f"speed: {len(grid.configs)} configurations, {len(grid.configs) - total} already measured, {total} to go "
        f"in {len(todo)} processes per pass, {rounds} passes")

    def finish(cs: list[Config]) -> None:  # the configurations with all their passes: pooled, appended
        rows = []
        for c in cs:
            if c.id not in done and len(passes.get(c.id, {})) >= rounds:
                row = pooled_row([passes[c.id][k] for k in sorted(passes[c.id])])
                row.update({"machine": machine, "harness_overhead_ms": overhead,
                            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")})
                done[c.id] = row
                rows.append(row)
        append_jsonl(path, rows)

    finish(grid.configs)  # passes complete before a kill
    order = list(todo)
    for rnd in range(rounds):
        for g in order if rnd % 2 == 0 else order[::-1]:
            cs = [c for c in todo[g] if rnd not in passes.get(c.id, {})]
            if not cs:
                continue
            start = time.perf_counter()
            if not all(is_exported(c, exports) for c in cs):
                isolated(make_exports, cs, str(exports))  # apart, so that exporting weighs on no measured process
            rows = isolated(measure_group, cs, str(exports), device, threads, per_pass["repeats"],
                            per_pass["max_seconds"], per_pass["min_repeats"])
            for r in rows:
                r["round"] = rnd
                passes.setdefault(r["config"], {})[rnd] = r
            append_jsonl(passes_path, rows)
            finish(cs)
            rate = max(r["batch"] / np.median(r["sample_times_ms"]) * 1000 for r in rows)
            log(f"[pass {rnd + 1}/{rounds}] {' '.join(g)}: {len(rows)} configurations in "
                f"{time.perf_counter() - start:.0f} s (best {rate:.1f} images/s); "
                f"{sum(c.id in done for c in grid.configs)}/{len(grid.configs)} configurations done")
    return [done[c.id] for c in grid.configs if c.id in done]
