"""Hostile input to every command: a user mistake is one ``error:`` line naming the option or file, exit code 2,
no traceback, nothing written, and it is caught before any expensive work (sampling, feature extraction)."""

import errno
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from distill.checkpoint import atomic_write
from distill.cli import main
from distill.errors import UsageError

TINY_ARGS = ["--data", "digits", "--channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1",
             "--batch-size", "16", "--warmup", "2"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder with its own feature cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A tiny class-conditional digits teacher (one step), shared by the tests that need a model."""
    from distill.teacher import build_teacher, train_teacher

    out = tmp_path_factory.mktemp("model") / "run"
    run = build_teacher(data_spec="digits", image_size=None, unconditional=False, schedule="cosine",
                        prediction="v", channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="4",
                        dropout=0.0, label_dropout=0.1, train=dict(steps=1, batch_size=8, warmup=0))
    train_teacher(run, out, progress=False)
    return str(out)


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if anything is sampled: the mistake must be caught before."""
    import distill.sampling

    def refuse(*args, **kwargs):
        raise AssertionError("sampled before the mistake was caught")

    monkeypatch.setattr(distill.sampling, "generate", refuse)


def run(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``distill ARGS`` in-process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["distill", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def usage_error(monkeypatch, capsys, args, *needles, after_progress=False) -> str:
    """Run ``args``; assert exit code 2 and exactly one ``error:`` line holding every needle; return the line.
    ``after_progress``: the mistake shows only at the end (a full disk), after the progress bar's lines."""
    code, err = run(monkeypatch, capsys, *args)
    if after_progress:
        assert err.count("error:") == 1, err
        err = err.rpartition("\r")[2]
    lines = err.strip().splitlines()
    assert code == 2, (args, code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def nothing_in(folder) -> bool:
    return not os.path.exists(folder) or not any(os.scandir(folder))


# -- option values click accepts but the command cannot use -----------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["sample", "m", "--guidance", "nan"], "--guidance"),
    (["sample", "m", "--guidance", "inf"], "--guidance"),
    (["eval", "m", "--guidance", "-inf"], "--guidance"),
    (["sample", "m", "--sampler", "ddim", "--eta", "nan"], "--eta"),
    (["sample", "m", "--steps", "0"], "--steps"),
    (["sample", "m", "--steps", "100000"], "--steps"),
    (["sample", "m", "--batch-size", "0"], "--batch-size"),
    (["eval", "m", "--batch-size", "-1"], "--batch-size"),
    (["sample", "m", "--out", ""], "--out"),
    (["sample", ""], "CHECKPOINT"),
    (["eval", ""], "SOURCE"),
    (["eval", "m", "--out", ""], "--out"),
    (["eval", "m", "--ref", "C"], "--ref"),
    (["eval", "m", "--inception-backend", "bogus"], "--inception-backend"),
    (["teacher", "train", "--data", "digits", "--out", ""], "--out"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--threads", "0"], "--threads"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--threads", "100000"], "--threads"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--lr", "nan"], "--lr"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--dropout", "nan"], "--dropout"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--label-dropout", "nan"], "--label-dropout"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--grad-clip", "inf"], "--grad-clip"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--seed", "-1"], "--seed"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--seed", str(2**64)], "--seed"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--steps", "9" * 30], "--steps"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--batch-size", "99999999999"], "--batch-size"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--channel-mult", "0-99999999999"], "--channel-mult"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--channel-mult", "1,100000"], "--channel-mult"),
    (["teacher", "train", "--data", "digits", "--out", "r", "--attn", "0-99999999999"], "--attn"),
    (["teacher", "train", "--data", "digits"], "--out"),
    (["teacher", "publish", "run", "x.safetensors", "--guidance", "nan"], "--guidance"),
    (["teacher", "publish", "run", ""], "DEST"),
    (["bogus"], "bogus"),
    (["teacher", "bogus"], "bogus"),
])
def test_bad_option_values_are_one_line(monkeypatch, capsys, tmp_path, args, needle):
    usage_error(monkeypatch, capsys, args, needle)
    assert not (tmp_path / "r").exists() and not (tmp_path / "samples").exists()


def test_a_click_error_is_one_line_from_a_real_process(tmp_path):
    res = subprocess.run([sys.executable, "-m", "distill.cli", "sample", "m", "--steps", "0"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: Invalid value for '--steps': 0 is not in the range 1<=x<=10000.")
    assert line.endswith("sample --help')")


# -- devices ----------------------------------------------------------------------------------------------------


def _missing_devices() -> list[str]:
    devices = ["cuda:99", "banana", "meta", "xla"]
    if not torch.cuda.is_available():
        devices.append("cuda")
    if not torch.backends.mps.is_available():
        devices.append("mps")
    return devices


@pytest.mark.parametrize("device", _missing_devices())
def test_a_device_this_machine_lacks_is_refused_before_any_work(monkeypatch, capsys, tmp_path, model, no_sampling,
                                                                  device):
    usage_error(monkeypatch, capsys, ["sample", model, "--device", device, "--seeds", "0-1", "--out", "s"],
                "--device", device)
    usage_error(monkeypatch, capsys, ["eval", model, "--device", device, "--seeds", "0-1", "--metrics", "fd"],
                "--device", device)
    usage_error(monkeypatch, capsys, ["eval", model, "--device", device, "--metrics", "fid", "--inception-backend",
                                      "torch-bf16"], "--device", device)
    assert not (tmp_path / "s").exists()


def test_eval_refuses_the_onnxruntime_backend_off_the_cpu_before_sampling(monkeypatch, capsys, model, no_sampling):
    import distill.preflight

    monkeypatch.setattr(distill.preflight, "check_device", lambda device, option="--device": device)  # "a GPU"
    usage_error(monkeypatch, capsys, ["eval", model, "--device", "cuda", "--metrics", "fd,fid", "--seeds", "0-9"],
                "--inception-backend", "--device cuda")


# -- output locations -------------------------------------------------------------------------------------------


def test_outputs_under_a_file_or_onto_a_file_are_refused(monkeypatch, capsys, tmp_path, model, no_sampling):
    (tmp_path / "file").write_text("x")
    usage_error(monkeypatch, capsys, ["sample", model, "--seeds", "0", "--out", "file/sub"], "--out", "file")
    usage_error(monkeypatch, capsys, ["sample", model, "--seeds", "0", "--out", "file"], "--out", "file")
    usage_error(monkeypatch, capsys, ["eval", model, "--seeds", "0-9", "--metrics", "fd", "--out", "file/r.json"],
                "--out", "file")
    usage_error(monkeypatch, capsys, ["eval", model, "--seeds", "0-9", "--metrics", "fd", "--out", "."], "--out")
    usage_error(monkeypatch, capsys, ["teacher", "publish", model, "file/x.safetensors"], "DEST", "file")
    usage_error(monkeypatch, capsys, ["teacher", "train", *TINY_ARGS, "--out", "file/run"], "--out", "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_output_folder_is_refused(monkeypatch, capsys, tmp_path, model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        usage_error(monkeypatch, capsys, ["sample", model, "--seeds", "0", "--steps", "1", "--out", ro / "s"],
                    "--out", "ro")
    finally:
        ro.chmod(0o755)
    assert nothing_in(ro)


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(monkeypatch, capsys, tmp_path, model):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    line = usage_error(monkeypatch, capsys, ["sample", model, "--seeds", "0-1", "--steps", "1", "--out", "s"],
                       "samples.npz", "no space left", after_progress=True)
    assert "free space" in line
    assert nothing_in(tmp_path / "s")  # no temp file, no half-written npz


@pytest.mark.parametrize("where,code,needle", [
    ("write", errno.ENOSPC, "no space left"),
    ("write", errno.EDQUOT, "quota"),
    ("mkstemp", errno.EROFS, "read-only"),
    ("mkstemp", errno.EACCES, "permission denied"),
    ("replace", errno.EACCES, "permission denied"),
])
def test_atomic_write_turns_an_unwritable_location_into_a_usage_error(monkeypatch, tmp_path, where, code, needle):
    import tempfile

    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    def write(tmp):
        open(tmp, "wb").write(b"half")
        if where == "write":
            fail()

    if where == "mkstemp":
        monkeypatch.setattr(tempfile, "mkstemp", fail)
    if where == "replace":
        monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(UsageError, match=needle) as e:
        atomic_write(target, write)
    assert str(target) in str(e.value)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with pytest.raises(UsageError, match="folder"):
        atomic_write(tmp_path, write)
    monkeypatch.undo()
    def raising(error):
        def write(tmp):
            raise error
        return write

    with pytest.raises(UsageError, match="no space left"):  # safetensors wraps the OSError in its own error
        atomic_write(target, raising(RuntimeError("Error while serializing: I/O error: No space left on device "
                                                  "(os error 28)")))
    with pytest.raises(RuntimeError, match="unrelated"):  # any other failure is not the user's to fix
        atomic_write(target, raising(RuntimeError("unrelated")))
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        atomic_write(tmp_path / "f" / "sub" / "x.bin", lambda tmp: None)


# -- data -------------------------------------------------------------------------------------------------------


def _png(path, size=(8, 8), value=0, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def _bad_data(tmp_path) -> dict:
    """Named broken datasets: spec -> text the error must contain."""
    d = tmp_path / "data"
    d.mkdir()
    cases = {}

    def npz(name, needle, **arrays):
        np.savez(d / f"{name}.npz", **arrays)
        cases[f"npz:{d / name}.npz"] = needle

    x8 = np.zeros((4, 8, 8), np.uint8)
    nan = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    nan[2, 3, 3] = np.nan
    npz("nan", "NaN or Inf", x=nan)
    npz("inf", "NaN or Inf", x=np.where(nan > 2, 0, np.inf).astype(np.float32))
    npz("strings", "dtype <U1", x=np.array([[["a"]]]))
    npz("complex", "dtype complex", x=np.ones((4, 8, 8), np.complex64))
    npz("twod", "shape (4, 8)", x=np.zeros((4, 8), np.uint8))
    npz("channels", "channel axis", x=np.zeros((4, 8, 8, 7), np.uint8))
    npz("emptydims", "empty", x=np.zeros((4, 0, 0), np.uint8))
    npz("none", "no images", x=np.zeros((0, 8, 8), np.uint8))
    npz("int300", "uint8", x=np.full((4, 8, 8), 300, np.int64))
    npz("floatlabels", "labels", x=x8, y=np.array([0.0, 1.0, 2.0, 3.0]))
    npz("labels2d", "labels", x=x8, y=np.zeros((2, 2), np.int64))
    npz("hugelabel", "too large", x=x8, y=np.array([0, 1, 2, 10**12]))
    npz("boollabels", "labels", x=x8, y=np.array([True, False, True, True]))
    npz("nokey", "no 'x'", z=x8)
    np.savez(d / "ok.npz", x=x8)
    (d / "trunc.npz").write_bytes((d / "ok.npz").read_bytes()[:100])
    cases[f"npz:{d / 'trunc.npz'}"] = "trunc.npz"
    (d / "garbage.npz").write_bytes(b"hello")
    cases[f"npz:{d / 'garbage.npz'}"] = "not an .npz"
    with open(d / "npy.npz", "wb") as f:
        np.save(f, x8)
    cases[f"npz:{d / 'npy.npz'}"] = "not an .npz"
    np.savez(d / "objects.npz", x=np.array([None, 1], dtype=object))
    cases[f"npz:{d / 'objects.npz'}"] = "objects.npz"

    _png(d / "trunc" / "a.png")
    _png(d / "trunc" / "b.png")
    data = (d / "trunc" / "b.png").read_bytes()
    (d / "trunc" / "b.png").write_bytes(data[: len(data) // 2])
    cases[f"folder:{d / 'trunc'}"] = "b.png"
    (d / "notimage").mkdir()
    (d / "notimage" / "a.png").write_text("not a png")
    cases[f"folder:{d / 'notimage'}"] = "a.png"
    _png(d / "mixed" / "a.png")
    _png(d / "mixed" / "b.png", size=(16, 16))
    cases[f"folder:{d / 'mixed'}"] = "b.png"
    _png(d / "oblong" / "a.png", size=(12, 8))
    cases[f"folder:{d / 'oblong'}"] = "not square"
    (d / "empty").mkdir()
    cases[f"folder:{d / 'empty'}"] = "no .png"
    _png(d / "emptyclass" / "cat" / "a.png")
    (d / "emptyclass" / "dog").mkdir()
    cases[f"folder:{d / 'emptyclass'}"] = "dog"
    _png(d / "both" / "cat" / "a.png")
    _png(d / "both" / "stray.png")
    cases[f"folder:{d / 'both'}"] = "class subfolders"
    cases[f"folder:{d / 'missing'}"] = "no such folder"
    cases["folder:"] = "folder:"
    cases["npz:"] = "npz:"
    cases["cifar"] = "unknown dataset"
    return cases


def test_broken_data_is_one_line_naming_the_file(monkeypatch, capsys, tmp_path):
    for spec, needle in _bad_data(tmp_path).items():
        line = usage_error(monkeypatch, capsys, ["teacher", "train", *TINY_ARGS[2:], "--data", spec, "--out", "r"],
                           needle)
        name = spec.partition(":")[2]
        assert not name or os.path.basename(name) in line, (spec, line)
        assert not (tmp_path / "r").exists(), spec


def test_broken_data_as_eval_source_or_reference(monkeypatch, capsys, tmp_path, model, no_sampling):
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((4, 8, 8), np.nan, np.float32))
    usage_error(monkeypatch, capsys, ["eval", nan, "--data", "digits", "--metrics", "fd"], "nan.npz", "NaN")
    usage_error(monkeypatch, capsys, ["eval", model, "--data", f"npz:{nan}", "--seeds", "0-9"], "nan.npz", "NaN")
    big = tmp_path / "big.npz"
    np.savez(big, images=np.zeros((20, 32, 32, 1), np.uint8))
    usage_error(monkeypatch, capsys, ["eval", big, "--data", "digits", "--metrics", "fd"], "1x32x32", "1x8x8",
                "--data")
    usage_error(monkeypatch, capsys, ["eval", model, "--data", "mnist", "--metrics", "fd", "--seeds", "0-9"],
                "--data mnist")
    usage_error(monkeypatch, capsys, ["eval", tmp_path / "missing.npz", "--data", "digits"], "missing.npz")
    usage_error(monkeypatch, capsys, ["eval", "no-such-model", "--data", "digits"], "no-such-model")
    (tmp_path / "pngs").mkdir()
    usage_error(monkeypatch, capsys, ["eval", tmp_path / "pngs", "--data", "digits"], "folder:")
    usage_error(monkeypatch, capsys, ["eval", model, "--data", f"npz:{big}", "--seeds", "0-9"],
                "domain classifier")  # fd/kid/is/acc of data with no classifier: before sampling


def test_image_size_only_resizes_folder_data(monkeypatch, capsys, tmp_path):
    usage_error(monkeypatch, capsys, ["teacher", "train", *TINY_ARGS, "--image-size", "16", "--out", "r"],
                "--image-size 16", "8x8")
    assert not (tmp_path / "r").exists()


def test_a_folder_is_read_one_image_at_a_time(tmp_path):
    import resource

    from distill.data import load_dataset

    for i in range(60):
        _png(tmp_path / "many" / f"{i:03d}.png", value=i)
    open_now = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 20, hard))  # far fewer than 60 images
    try:
        data = load_dataset(f"folder:{tmp_path / 'many'}")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert data.images.shape == (60, 1, 8, 8)


# -- seeds, classes, metrics, sampler settings ------------------------------------------------------------------


@pytest.mark.parametrize("option,value,needle", [
    ("--seeds", "0-99999999999999999999", "2**63"),
    ("--seeds", str(2**63), "2**63"),
    ("--seeds", "-1", "negative"),
    ("--seeds", "0-10000000000", "1,000,000"),
    ("--seeds", "", "empty"),
    ("--seeds", "5-3", "backwards"),
    ("--seeds", "0,0,1,1,2,2", "seed 0 is given more than once (3 repeats)"),  # a metric would count them twice
    ("--seeds", "3,0-4", "seed 3 is given more than once (1 repeat)"),
    ("--classes", "10", "0-9"),
    ("--classes", "-1", "negative"),
    ("--classes", "0-99999999999", "1,000,000"),
    ("--classes", "", "empty"),
])
def test_seeds_and_classes_out_of_range_are_refused_at_once(monkeypatch, capsys, tmp_path, model, no_sampling,
                                                            option, value, needle):
    start = time.perf_counter()
    usage_error(monkeypatch, capsys, ["sample", model, option, value, "--out", "s"], option, needle)
    usage_error(monkeypatch, capsys, ["eval", model, option, value, "--metrics", "fd"], option, needle)
    assert time.perf_counter() - start < 5 and not (tmp_path / "s").exists()


def test_eta_needs_the_ddim_sampler(monkeypatch, capsys, tmp_path, model, no_sampling):
    usage_error(monkeypatch, capsys, ["sample", model, "--eta", "0.5", "--out", "s"], "--eta", "ddim")
    usage_error(monkeypatch, capsys, ["eval", model, "--sampler", "heun", "--eta", "0.5"], "--eta", "ddim")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("metrics,needle", [("", "empty"), (",", "empty"), ("fd,,bogus", "unknown bogus")])
def test_bad_metric_lists(monkeypatch, capsys, model, no_sampling, metrics, needle):
    usage_error(monkeypatch, capsys, ["eval", model, "--metrics", metrics, "--seeds", "0-99"], "--metrics", needle)


@pytest.mark.parametrize("seeds,metrics,needle", [
    ("0", "fd", "at least 2"),
    ("0", "kid", "at least 2"),
    ("0-4", "is", "at least 20"),
    ("0-9", "fd,is", "at least 20"),
])
def test_eval_refuses_too_few_samples_before_sampling(monkeypatch, capsys, model, no_sampling, seeds, metrics,
                                                       needle):
    usage_error(monkeypatch, capsys, ["eval", model, "--seeds", seeds, "--metrics", metrics], "--seeds", needle)


def test_eval_refuses_too_few_images(monkeypatch, capsys, tmp_path):
    one = tmp_path / "one.npz"
    np.savez(one, images=np.zeros((1, 8, 8, 1), np.uint8), labels=np.array([3]))
    usage_error(monkeypatch, capsys, ["eval", one, "--data", "digits", "--metrics", "fd"], "one.npz", "at least 2")
    three = tmp_path / "three.npz"
    np.savez(three, x=np.zeros((3, 8, 8), np.uint8))
    # real:B of 3 images is 2, but the reference half A holds only 1: FID needs 2 on both sides
    usage_error(monkeypatch, capsys, ["eval", "real:B", "--data", f"npz:{three}", "--metrics", "fid"],
                "--ref A", "1 image")
    usage_error(monkeypatch, capsys, ["eval", "real:C", "--data", "digits"], "real:C")
    assert not (tmp_path / "cache").exists()  # nothing was extracted


def test_eval_of_images_refuses_sampling_options_and_unlabelled_acc(monkeypatch, capsys, tmp_path):
    x = tmp_path / "x.npz"
    np.savez(x, images=np.zeros((30, 8, 8, 1), np.uint8))
    for option, value in (("--steps", "5"), ("--seeds", "0-9"), ("--eta", "0.1"), ("--guidance", "1")):
        usage_error(monkeypatch, capsys, ["eval", x, "--data", "digits", option, value], option, "images")
    usage_error(monkeypatch, capsys, ["eval", x, "--data", "digits", "--metrics", "fd,acc"], "acc", "labels")


# -- config files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,needle", [
    (b"teacher:\n  steps: \xff\xfe3\n", "UTF-8"),
    ("teacher:\n  steps: 2\n".encode("utf-16"), "UTF-8"),
    (b"", "is empty"),
    (b"teacher:\n  data: null\n", "'data'"),
    (b"teacher:\n  steps: {a: 1}\n", "'steps'"),
    (b"teacher:\n  steps: abc\n", "'steps'"),
    (b"teacher:\n  bf16: maybe\n", "'bf16'"),
    (b"teacher:\n  out: ''\n", "'out'"),
    (b"teacher:\n  steps: 10\n  steps: 20\n", "line 3: key 'steps' is given twice (first on line 2)"),
    (b"teacher:\n  batch-size: 8\n  batch_size: 16\n", "'batch-size' and 'batch_size'"),
    (b"teacher:\n  lr: 1e-4\nteacher:\n  lr: 2e-4\n", "key 'teacher' is given twice"),
])
def test_bad_config_files(monkeypatch, capsys, tmp_path, content, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    usage_error(monkeypatch, capsys, ["teacher", "train", "--config", cfg, "--data", "digits", "--out", "r"],
                "c.yaml", needle)
    assert not (tmp_path / "r").exists()


def test_a_config_that_is_a_folder_or_empty_path(monkeypatch, capsys, tmp_path):
    (tmp_path / "d.yaml").mkdir()
    usage_error(monkeypatch, capsys, ["teacher", "train", "--config", "d.yaml", "--data", "digits", "--out", "r"],
                "--config", "d.yaml")
    usage_error(monkeypatch, capsys, ["teacher", "train", "--config", "", "--data", "digits", "--out", "r"],
                "--config")


# -- the feature cache heals itself -----------------------------------------------------------------------------


def test_a_corrupt_reference_cache_entry_is_recomputed(tmp_path, capsys):
    from safetensors.torch import load_file

    from benchmarks.metrics import cache_dir, domain_extractor, reference_features
    from distill.data import load_dataset

    data, ext = load_dataset("digits"), domain_extractor("digits")
    first = reference_features(data, "A", ext, progress=False)
    (path,) = (cache_dir() / "reference").glob("*.safetensors")
    for garbage in (b"garbage", b""):
        path.write_bytes(garbage)
        again = reference_features(data, "A", ext, progress=False)
        assert torch.equal(again["features"], first["features"])
        assert torch.equal(load_file(path)["features"], first["features"])  # rewritten, readable again
    assert "recomputing" in capsys.readouterr().err
    # intact header, keys and shapes, wrong values: bytes flipped inside the tensor data, or other values written in
    data_bytes = bytearray(path.read_bytes())
    data_bytes[-5] ^= 0xFF
    path.write_bytes(bytes(data_bytes))
    assert torch.equal(reference_features(data, "A", ext, progress=False)["features"], first["features"])
    assert "checksum mismatch" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({k: torch.zeros_like(v) for k, v in first.items()}, path)  # no checksum (or a foreign writer)
    assert torch.equal(reference_features(data, "A", ext, progress=False)["features"], first["features"])
    assert "no checksum" in capsys.readouterr().err


def test_a_corrupt_onnx_cache_entry_is_exported_again(monkeypatch, tmp_path):
    from benchmarks import inception, metrics

    exported = []

    def tiny_export(path, channels):  # a stand-in for the 90 MB Inception network, same input and output names
        exported.append(path)
        net = torch.nn.Sequential(torch.nn.Conv2d(channels, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten())
        atomic_write(path, lambda tmp: torch.onnx.export(
            net, (torch.zeros(2, channels, 8, 8),), tmp, dynamo=False, input_names=["x"], output_names=["features"],
            dynamic_axes={"x": {0: "n"}, "features": {0: "n"}}, opset_version=17))

    monkeypatch.setattr(metrics, "_export_inception", tiny_export)
    path = metrics.cache_dir() / f"inception-{inception.SHA1[:12]}-c1.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx file")
    session = metrics._inception_session(1)
    assert exported == [path]
    assert session.run(None, {"x": np.zeros((3, 1, 8, 8), np.float32)})[0].shape == (3, 4)
    assert metrics._inception_session(1) is not None and len(exported) == 1  # now a hit


@pytest.mark.parametrize("args,needle", [
    (["teacher", "train", "--data", "digits", "--attn", "3", "--channels", "8", "--steps", "1", "--out", "run"],
     "--attn 3: no level of this UNet is 3x3; its levels are 8, 4"),
    (["teacher", "publish", "mnist", "x.npz"], "must end in .safetensors"),
    (["teacher", "publish", "mnist", "x.safetensors", "--data", "bogus"], "--data 'bogus': unknown dataset"),
])
def test_teacher_options_that_would_be_silently_wrong(monkeypatch, capsys, tmp_path, args, needle):
    monkeypatch.chdir(tmp_path)
    usage_error(monkeypatch, capsys, args, needle)
    assert not list(tmp_path.iterdir())


def test_the_cli_offers_every_sampler():
    from distill.app.cli.common import SAMPLER_NAMES
    from distill.samplers import SAMPLERS

    assert SAMPLER_NAMES == tuple(SAMPLERS)
