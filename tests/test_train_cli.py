"""Teacher training, exact resume, sampling and the CLI's behaviour on good and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from distill.cli import cli
from distill.errors import UsageError
from distill.parsing import parse_int_list
from distill.teacher import build_teacher, train_teacher
from distill.training import TrainConfig, batch_indices, learning_rate

TINY = dict(data_spec="digits", image_size=None, unconditional=False, schedule="cosine", prediction="v",
            channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="4", dropout=0.1, label_dropout=0.2)
TINY_ARGS = ["--data", "digits", "--channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1",
             "--batch-size", "16", "--warmup", "2"]


def _train(out, steps, resume=False, **train):
    run = build_teacher(**TINY, train=dict(steps=steps, batch_size=16, warmup=2, ckpt_every=2, **train))
    return train_teacher(run, out, resume=resume, progress=False)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    _train(tmp_path / "straight", 6)
    _train(tmp_path / "split", 3)
    _train(tmp_path / "split", 6, resume=True)
    a = load_file(tmp_path / "straight" / "train_state.safetensors")
    b = load_file(tmp_path / "split" / "train_state.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_the_log_of_a_resumed_run_reads_as_one_uninterrupted_run(tmp_path):
    """Logged every 4 steps, checkpointed every 2: the resumed run's first line still averages steps 1-4."""
    def losses(run):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (run / "metrics.jsonl").read_text(
            ).splitlines())]

    from distill.losses import DiffusionLoss

    _train(tmp_path / "straight", 8, log_every=4)
    original, calls = DiffusionLoss.forward, {"n": 0}

    def dying(self, *a):
        calls["n"] += 1
        if calls["n"] == 4:  # killed in step 4: the checkpoint of step 2 is on disk, no log line yet
            raise KeyboardInterrupt
        return original(self, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DiffusionLoss, "forward", dying)
        with pytest.raises(KeyboardInterrupt):
            _train(tmp_path / "split", 8, log_every=4)
    assert not (tmp_path / "split" / "metrics.jsonl").read_text()
    _train(tmp_path / "split", 8, resume=True, log_every=4)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def test_a_fresh_run_drops_the_log_of_a_run_that_saved_nothing(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')  # killed before a save
    _train(run, 4)
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4 and 9.0 not in [json.loads(ln)["loss"] for ln in (
        run / "metrics.jsonl").read_text().splitlines()]


def test_training_reduces_the_loss(tmp_path):
    _train(tmp_path / "r", 40, lr=2e-3)
    records = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]
    assert {"step", "loss", "grad_norm", "lr", "sec_per_step"} <= records[0].keys()


def test_resuming_with_fewer_steps_than_done_is_refused_and_changes_nothing(tmp_path):
    _train(tmp_path / "r", 4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    with pytest.raises(UsageError, match="already at step 4, past --steps 2; give --steps 4 or more"):
        _train(tmp_path / "r", 2, resume=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    _train(tmp_path / "r", 2)
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="--resume"):
        _train(tmp_path / "r", 2)
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before
    with pytest.raises(UsageError, match="nothing to resume"):
        _train(tmp_path / "new", 2, resume=True)


def test_lr_schedule_and_batches():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, lr_decay="linear")
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 55) == pytest.approx(0.5) and learning_rate(cfg, 100) == pytest.approx(0.0)
    # consecutive batches of one epoch are a permutation of the dataset
    idx = torch.cat([batch_indices(10, 5, s, seed=3) for s in range(2)])
    assert sorted(idx.tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 4, 7, 3), batch_indices(10, 4, 7, 3))


def test_parse_int_list():
    assert parse_int_list("0-3,7", "--seeds") == [0, 1, 2, 3, 7]
    with pytest.raises(UsageError, match="--seeds"):
        parse_int_list("3-1", "--seeds")


def test_cli_train_then_sample(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(cli, ["teacher", "train", *TINY_ARGS, "--out", str(out), "--steps", "3"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").exists()
    res = runner.invoke(cli, ["sample", str(out), "--sampler", "heun", "--steps", "2", "--classes", "0-9",
                              "--seeds", "0-19", "--guidance", "1.5", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    z = np.load(tmp_path / "s" / "samples.npz")
    assert z["images"].shape == (20, 8, 8, 1) and z["images"].dtype == np.uint8
    assert z["labels"].tolist() == list(range(10)) * 2 and z["seeds"].tolist() == list(range(20))
    assert json.loads(str(z["info"]))["guidance"] == 1.5
    assert (tmp_path / "s" / "grid.png").stat().st_size > 0
    # the same seeds give the same images, whatever the batch size
    res = runner.invoke(cli, ["sample", str(out), "--sampler", "heun", "--steps", "2", "--classes", "0-9",
                              "--seeds", "0-19", "--guidance", "1.5", "--batch-size", "7",
                              "--out", str(tmp_path / "s2")])
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.load(tmp_path / "s2" / "samples.npz")["images"], z["images"])


def _distill(*args, cwd):
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args,code,needle", [
    (["teacher", "train", "--data", "cifar", "--out", "x"], 2, "--data 'cifar': unknown dataset"),
    (["sample", "missing.safetensors"], 2, "missing.safetensors: no such checkpoint"),
    (["sample", "x.safetensors", "--seeds", "a-b"], 2, "--seeds 'a-b'"),
    (["teacher", "train", "--data", "digits"], 2, "Missing option '--out'"),
])
def test_cli_errors_are_one_clear_line(tmp_path, args, code, needle):
    res = _distill(*args, cwd=tmp_path)
    assert res.returncode == code, res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()


def test_help_imports_no_torch():
    # What keeps `distill --help` under a second: no heavy import before a command runs.
    res = subprocess.run([sys.executable, "-c", "import sys; from distill.cli import main; "
                          "sys.argv = ['distill', 'teacher', 'train', '--help']; main(); "
                          "assert 'torch' not in sys.modules, 'distill --help imported torch'"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--data" in res.stdout


def test_bf16_autocast_training_runs(tmp_path):
    _train(tmp_path / "bf16", 2, bf16=True)
    rec = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(rec["loss"]) and rec["step"] == 2


def test_unconditional_model_rejects_guidance(tmp_path):
    run = build_teacher(**{**TINY, "unconditional": True}, train=dict(steps=1, batch_size=8, warmup=0))
    train_teacher(run, tmp_path / "u", progress=False)
    res = CliRunner().invoke(cli, ["sample", str(tmp_path / "u"), "--guidance", "2", "--steps", "1"])
    assert isinstance(res.exception, UsageError) and "--guidance" in str(res.exception)
    assert not (tmp_path / "u" / "samples").exists()


def test_teacher_train_reads_a_yaml_config_and_flags_win(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"""teacher:
  data: digits
  out: {tmp_path / 'run'}
  channels: 8
  channel-mult: [1, 2]
  num_res_blocks: 1
  attn: []
  batch-size: 8
  warmup: 1
  steps: 3
""")
    r = CliRunner().invoke(cli, ["teacher", "train", "--config", str(cfg), "--steps", "2"])
    assert r.exit_code == 0, r.output
    state = load_file(tmp_path / "run" / "train_state.safetensors")
    from distill.checkpoint import read_metadata

    meta = read_metadata(tmp_path / "run" / "train_state.safetensors")
    assert meta["step"] == 2 and meta["model"]["config"]["channels"] == 8 and state
    assert meta["data"]["spec"] == "digits"


@pytest.mark.parametrize("text,message", [
    ("teacher:\n  data: digits\n  bogus_key: 1\n", "unknown key 'bogus_key'"),
    ("teacher: [1, 2\n", "not valid YAML"),
    ("student:\n  data: digits\n", "needs a 'teacher:' mapping"),
])
def test_bad_config_files_are_one_clear_line(tmp_path, text, message):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(text)
    r = subprocess.run([sys.executable, "-m", "distill.cli", "teacher", "train", "--config", str(cfg), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_publish_records_guidance_and_data_and_loads_by_name(tmp_path, monkeypatch):
    import distill.checkpoint as ckpt
    from distill.checkpoint import load_denoiser, read_metadata

    _train(tmp_path / "run", 2)
    monkeypatch.setattr(ckpt, "SHIPPED_DIR", tmp_path / "weights")
    (tmp_path / "weights").mkdir()
    r = CliRunner().invoke(cli, ["teacher", "publish", str(tmp_path / "run"),
                                 str(tmp_path / "weights" / "tiny.safetensors"), "--guidance", "0.5"])
    assert r.exit_code == 0, r.output
    meta = read_metadata(tmp_path / "weights" / "tiny.safetensors")
    assert meta["card"]["guidance"] == 0.5 and meta["data"]["spec"] == "digits"
    assert ckpt.shipped_models() == ["tiny"]
    den = load_denoiser("tiny")
    assert den.null_label == 10
    r = CliRunner().invoke(cli, ["sample", "tiny", "--steps", "1", "--seeds", "0-3", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    info = json.loads(str(np.load(tmp_path / "s" / "samples.npz")["info"]))
    assert info["guidance"] == 0.5  # the card's default
