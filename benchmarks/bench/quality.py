"""``distill bench quality``: FD / KID / class accuracy (FID with ``--metrics``) of every grid configuration.

Every configuration draws the same samples: sample ``i`` comes from seed ``i`` (:class:`PerSampleGenerator`), so
results do not depend on the batch size or on how generation is sharded. Configurations with the same numerics
(fp32 on any backend; bf16 autocast eager or compiled) share one measurement, made on the fastest of them
(:meth:`Grid.quality_configs`); the row records which (``quality_from``).

Generated samples are cached by configuration under ``OUT/samples/`` (keyed by the model's content hash, sampler,
steps, guidance, numerics and seeds) and the metrics appended to ``OUT/quality.jsonl``: a re-run skips both, so a
killed run resumes and the report costs nothing.

Sharding: started as several processes (``accelerate launch --multi_gpu --num_processes N -m distill.cli bench
quality ...``; with ``--device cuda`` each process takes its own GPU, on a CPU they join over gloo; ``torchrun
--nproc_per_node N`` works too), each process (accelerate's ``PartialState``) draws its contiguous share of the
seeds into a shard file, and the main process joins them in seed order and computes the metrics.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench.grid import Config, Grid
from benchmarks.bench.speed import append_jsonl, export_for, machine_info, open_backend, read_jsonl

LOG = logging.getLogger("distill")  # progress lines: the CLI prints them, a library caller configures logging

DEFAULT_BENCH_METRICS = ("fd", "kid", "acc")


def sample_file(out: Path, config: Config, seeds: list[int]) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{config.quality_id}_s{seeds[0]}-{seeds[-1]}_n{len(seeds)}")
    return out / "samples" / f"{name}.npz"


def draw(config: Config, seeds: list[int], exports: Path, device: str,
         batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The configuration's samples for ``seeds`` (uint8 NHWC) and their class labels."""
    from distill.sampling import draw_samples

    den = open_backend(config, exports, device)
    fused = getattr(den, "kind", "denoiser") == "sampler"
    # the class of sample i follows its seed (seed % classes), never its place in a shard
    classes = [s % den.num_classes for s in seeds] if den.num_classes else None
    images, labels = draw_samples(den, sampler=None if fused else config.sampler,
                                  steps=None if fused else config.steps, seeds=seeds, classes=classes,
                                  guidance=config.guidance,
                                  batch_size=batch_size, device=device, progress=False, source=config.model)
    return images, (labels.numpy() if labels is not None else None)


def shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous shard ``index`` of ``count`` over ``n`` seeds (the first ``n % count`` shards one longer), as
    accelerate's ``split_between_processes`` splits a list."""
    size, extra = divmod(n, count)
    start = index * size + min(index, extra)
    return start, start + size + (1 if index < extra else 0)


def generate_samples(config: Config, seeds: list[int], out: Path, exports: Path, device: str, batch_size: int,
                     index: int = 0, count: int = 1, wait: Callable[[], None] = lambda: None) -> Path | None:
    """Draw (or reuse) the samples of ``config``; with ``count`` processes, this one draws shard ``index`` and
    the main process (index 0) joins the shards once all are written (``wait`` is the barrier). Returns the
    sample file on the main process."""
    path = sample_file(out, config, seeds)
    if path.is_file():
        return path if index == 0 else None
    path.parent.mkdir(parents=True, exist_ok=True)
    lo, hi = shard_bounds(len(seeds), index, count)
    shard = path.with_suffix(f".shard{index}of{count}.npz")
    if not shard.is_file() and hi > lo:
        images, labels = draw(config, seeds[lo:hi], exports, device, batch_size)
        tmp = shard.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, seeds=np.array(seeds[lo:hi]),
                 **({"labels": labels} if labels is not None else {}))
        tmp.replace(shard)
    wait()
    if index != 0:
        return None
    parts = [np.load(path.with_suffix(f".shard{i}of{count}.npz")) for i in range(count)
             if shard_bounds(len(seeds), i, count)[1] > shard_bounds(len(seeds), i, count)[0]]
    arrays = {"images": np.concatenate([p["images"] for p in parts]),
              "seeds": np.concatenate([p["seeds"] for p in parts])}
    if "labels" in parts[0]:
        arrays["labels"] = np.concatenate([p["labels"] for p in parts])
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    for i in range(count):
        path.with_suffix(f".shard{i}of{count}.npz").unlink(missing_ok=True)
    return path


def run_quality(grid: Grid, out: Path, *, samples: int = 2500, data_spec: str = "mnist", ref: str = "A",
                metrics: tuple[str, ...] = DEFAULT_BENCH_METRICS, device: str = "cpu", batch_size: int = 250,
                force: bool = False, exports: Path | None = None, log: Callable[[str], None] = LOG.info) -> list[dict]:
    """Measure every quality class of ``grid`` not yet in ``out/quality.jsonl``; returns the rows for the grid
    (on the main process; other processes of an ``accelerate launch`` return an empty list)."""
    from accelerate import PartialState

    from benchmarks.metrics import Quality
    from distill.data import load_dataset

    state = PartialState(cpu=device == "cpu")  # on a CPU, several processes join over gloo
    if device == "cuda" and state.num_processes > 1:
        device = str(state.device)  # each process on its own GPU
    exports = exports or out / "exports"
    seeds = list(range(samples))
    path = out / "quality.jsonl"
    done = {r["quality_id"]: r for r in read_jsonl(path, ("quality_id",))
            if r.get("n_fake") == samples and r.get("data") == data_spec and r.get("ref", "").endswith(f":{ref}")
            and set(metrics) <= set(r.get("metrics", []))} if not force else {}
    todo = [c for c in grid.quality_configs() if c.quality_id not in done]
    quality = None
    if state.is_main_process:
        quality = Quality(load_dataset(data_spec), ref=ref, metrics=metrics, device=device, progress=False).prepare()
        quality.check_sizes(samples, "--samples", "pass a larger --samples")
        log(f"quality: {len(grid.quality_configs())} classes ({len(grid.configs)} configurations), "
            f"{len(grid.quality_configs()) - len(todo)} already measured, {len(todo)} to go, {samples} samples "
            f"each, {state.num_processes} process(es)")
    machine = machine_info(device)
    for i, c in enumerate(todo, 1):
        if force:
            if state.is_main_process:
                sample_file(out, c, seeds).unlink(missing_ok=True)
            state.wait_for_everyone()
        start = time.perf_counter()
        if state.is_main_process:  # the ONNX export, made once before any process opens it
            export_for(c.model, c.backend, c.precision, c.sampler, c.steps, c.guidance, exports)
        state.wait_for_everyone()
        file = generate_samples(c, seeds, out, exports, device, batch_size, state.process_index,
                                state.num_processes, state.wait_for_everyone)
        if not state.is_main_process:
            continue
        seconds = time.perf_counter() - start
        data = np.load(file)
        result = quality(data["images"], torch.from_numpy(data["labels"]) if "labels" in data else None)
        row = {"quality_id": c.quality_id, "model": c.model, "sampler": c.sampler, "steps": c.steps,
               "guidance": c.guidance, "numerics": c.numerics, "quality_from": c.id.rsplit("/", 1)[0],
               "data": data_spec, "metrics": list(metrics), "samples_file": str(file),
               "sample_seconds": round(seconds, 1), "processes": state.num_processes, "machine": machine,
               "command": c.command("quality"),
               **{k: v for k, v in result.items() if not isinstance(v, dict)}}
        append_jsonl(path, [row])
        done[c.quality_id] = row
        log(f"[{i}/{len(todo)}] {c.quality_id}: " + " ".join(f"{m}={row[m]:.4g}" for m in metrics if m in row)
            + f" ({seconds:.0f} s sampling)")
    if not state.is_main_process:
        return []
    return [done[c.quality_id] for c in grid.quality_configs() if c.quality_id in done]
