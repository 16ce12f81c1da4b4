"""The committed speed-against-quality report of the shipped MNIST teacher and students, in one command:

    python -m benchmarks.bench_mnist                  # CPU: writes benchmarks/results/bench_cpu.*
    python -m benchmarks.bench_mnist --device cuda    # GPU: writes benchmarks/results/bench_gpu.*

1. ``distill bench speed --grid mnist-cpu`` into ``<work>-1`` (``--work``, default ``runs/bench-<device>``): the
   first run, which also makes the ONNX exports (into ``<work>/exports``) where the quality step has not;
2. ``distill bench quality`` of the same grid into ``<work>`` (2,500 samples per configuration);
3. the same speed benchmark again into ``<work>``: the run the report shows;
4. ``distill bench report`` of ``<work>``, ``--compare <work>-1`` for the run-to-run spread, into
   ``benchmarks/results/bench_<device>.{csv,parquet,md,json,png,html}``;
5. a headless-Chromium screenshot of the HTML report (``bench_<device>_html.png``), when Chromium is installed.

Every step resumes: a killed run, started again, skips what its folder already holds.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(args: list[str]) -> None:
    print("+ " + " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grid", default="mnist-cpu")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=2500)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the grid, their timed calls pooled")
    ap.add_argument("--no-second-run", action="store_true", help="measure speed once (no run-to-run spread)")
    a = ap.parse_args(argv)
    kind = "gpu" if a.device.startswith("cuda") else "cpu"
    work = a.work or Path(f"runs/bench-{kind}")
    distill = [sys.executable, "-m", "distill.cli", "bench"]
    common = ["--grid", a.grid, "--device", a.device, "--exports", str(work / "exports")]
    speed = ["--repeats", str(a.repeats), "--max-seconds", str(a.max_seconds), "--rounds", str(a.rounds)]
    command = "python -m benchmarks.bench_mnist" + (f" --device {a.device}" if kind == "gpu" else "")
    report = distill + ["report", str(work), "--dest", str(RESULTS), "--name", f"bench_{kind}", "--command", command]
    if not a.no_second_run:
        first = Path(f"{work}-1")
        run(distill + ["speed", *common, *speed, "--out", str(first)])
        report += ["--compare", str(first)]
    run(distill + ["quality", *common, "--out", str(work), "--samples", str(a.samples)])
    run(distill + ["speed", *common, *speed, "--out", str(work)])
    run(report)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        from benchmarks.bench.screenshot import screenshot

        shot = screenshot(RESULTS / f"bench_{kind}.html", RESULTS / f"bench_{kind}_html.png", chromium)
        print(shot)
    else:
        print("Chromium not installed (apt-get install chromium): no screenshot of the HTML report")


if __name__ == "__main__":
    main()
