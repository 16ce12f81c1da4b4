"""Long runs that fail safely and resume exactly: stateful losses, NaN guard, run-dir lock, signals, debris,
validated model files, and data-parallel seeding."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.data import load_dataset
from distill.denoiser import Denoiser
from distill.errors import UsageError
from distill.losses import DiffusionLoss, TargetNetwork
from distill.models.unet import UNet, UNetConfig
from distill.rundir import run_lock, staged_dir
from distill.schedules import CosineSchedule
from distill.training import TrainConfig, Trainer

TINY_ARGS = ["--data", "digits", "--channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1",
             "--batch-size", "16", "--warmup", "0", "--attn", ""]
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, cwd=cwd,
                          **kwargs)


def _one_line_error(res, code: int, needle: str) -> None:
    assert res.returncode == code, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("train:")]  # the progress bar
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr, res.stderr


# -- a loss that owns state --------------------------------------------------------------------------------------


class TargetCurriculumLoss(DiffusionLoss):
    """A consistency-style loss: an EMA target network whose decay follows a curriculum mu(k), plus a buffer (a
    running mean of the loss) that feeds back into the objective, so a resume that dropped any of it would differ."""

    def __init__(self, net):
        super().__init__(label_dropout=0.2)
        self.target = TargetNetwork(net)
        self.register_buffer("running", torch.zeros(()))

    @staticmethod
    def mu(step: int) -> float:
        n = 2 + step // 2  # the discretization doubles its resolution as training goes (N(k))
        return math.exp(2 * math.log(0.9) / n)  # Song et al. (2023): mu(k) = exp(s0 log mu0 / N(k))

    def forward(self, model, x0, labels, generator):
        base = super().forward(model, x0, labels, generator)
        t = torch.full((x0.shape[0],), 0.5)
        with torch.no_grad():
            target = self.target(x0, 1000 * t, labels)
        online = model.net(x0, 1000 * t, labels)
        loss = base + (online - target).pow(2).flatten(1).mean(1) * (1 + self.running)
        self.running.mul_(0.9).add_(0.1 * loss.detach().mean())
        return loss

    def update(self, net, step):
        self.target.update(net, self.mu(step))

    def describe(self):
        return {"name": "target-curriculum-test"}


def _stateful_run(out: Path, steps: int, crash_at: int | None = None, resume: bool = False) -> Trainer:
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          dropout=0.1, num_classes=10))
    model = Denoiser(net, CosineSchedule(), "v", "t1000", null_label=10)
    loss = TargetCurriculumLoss(net)
    if crash_at is not None:  # a process killed mid-run: nothing is saved after the last periodic checkpoint
        original = loss.forward

        def forward(*args):
            if trainer.step + 1 == crash_at:
                raise RuntimeError("killed")
            return original(*args)

        loss.forward = forward
    cfg = TrainConfig(steps=steps, batch_size=16, warmup=0, lr=1e-3, ema_decay=0.0, ckpt_every=2)
    meta = {"model": {"arch": "unet", "config": net.config.to_dict()},
            "diffusion": {"schedule": model.schedule.config(), "prediction": "v", "time_input": "t1000"},
            "method": loss.describe()}
    trainer = Trainer(model, loss, load_dataset("digits"), cfg, out, meta)
    trainer.run(resume=resume, progress=False)
    return trainer


def test_a_loss_with_target_network_and_curriculum_resumes_to_the_same_weights(tmp_path):
    _stateful_run(tmp_path / "straight", 7)
    with pytest.raises(RuntimeError, match="killed"):
        _stateful_run(tmp_path / "killed", 7, crash_at=6)
    state = load_file(tmp_path / "killed" / "train_state.safetensors")
    assert {"loss.target.net.conv_in.weight", "loss.running"} <= state.keys()
    _stateful_run(tmp_path / "killed", 7, resume=True)  # from the step-4 checkpoint
    a = load_file(tmp_path / "straight" / "train_state.safetensors")
    b = load_file(tmp_path / "killed" / "train_state.safetensors")
    assert a.keys() == b.keys() and not any(k.startswith("ema.") for k in a)  # ema_decay 0: no EMA
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # without an EMA the model file holds the trained weights
    model = load_file(tmp_path / "straight" / "model.safetensors")
    assert torch.equal(model["conv_in.weight"], a["net.conv_in.weight"])


# -- fail safely ----------------------------------------------------------------------------------------------------


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, distill_main):
    out = tmp_path / "run"
    res = distill_main("teacher", "train", *TINY_ARGS, "--steps", "4", "--ckpt-every", "2", "--out", out)
    assert res.returncode == 0, res.stderr
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    res = distill_main("teacher", "train", *TINY_ARGS, "--steps", "40", "--ckpt-every", "2", "--lr", "1e6", "--out",
               str(out), "--resume")
    _one_line_error(res, 1, "the run diverged; kept the last good checkpoint (step 4)")
    assert "step" in res.stderr and "nan" in res.stderr.lower()
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == before
    assert not list(out.glob(".*.tmp"))


def test_a_second_run_on_a_locked_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    with run_lock(out):  # held by this process; the second run is another process, as in real life
        res = _cli("teacher", "train", *TINY_ARGS, "--steps", "2", "--out", str(out))
        _one_line_error(res, 2, "another distill run")
        assert str(os.getpid()) in res.stderr
        with pytest.raises(UsageError, match="another distill run"), run_lock(out):
            pass
    assert not (out / "train_state.safetensors").exists()
    with run_lock(out):  # released when the holder is done
        pass


def _train_until_logged(out: Path, extra=()):
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", "teacher", "train", *TINY_ARGS, "--steps", "100000",
                             "--ckpt-every", "100000", "--out", str(out), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_end_of_the_step_and_exits_with_its_code(tmp_path, sig, code, distill_main):
    out = tmp_path / "run"
    proc = _train_until_logged(out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "progress saved" in err
    from distill.checkpoint import read_metadata

    step = read_metadata(out / "train_state.safetensors")["step"]
    assert step >= 25 and read_metadata(out / "model.safetensors")["step"] == step
    assert not list(out.glob(".*.tmp"))
    res = distill_main("teacher", "train", *TINY_ARGS, "--steps", step + 2, "--ckpt-every", 100000, "--out", out,
                       "--resume")
    assert res.returncode == 0, res.stderr
    assert read_metadata(out / "train_state.safetensors")["step"] == step + 2


def test_debris_of_a_killed_write_does_not_trip_the_next_run(tmp_path, distill_main):
    out = tmp_path / "run"
    assert distill_main("teacher", "train", *TINY_ARGS, "--steps", "3", "--out", out).returncode == 0
    # what SIGKILL during a checkpoint and a log write would leave: a temp file and a line cut short
    (out / ".train_state.safetensors.x1y2.tmp").write_bytes(b"half a checkpoint")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    res = distill_main("teacher", "train", *TINY_ARGS, "--steps", "5", "--out", out, "--resume")
    assert res.returncode == 0, res.stderr
    assert not list(out.glob(".*.tmp"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 5]


def _tiny_progressive(teacher: Path, out: Path) -> list[str]:
    """A one-round progressive distillation (2 -> 1 steps, 2 optimizer steps, a checkpoint after each); its log."""
    from distill.distillation import ProgressiveOptions, distill_progressive

    lines: list[str] = []
    opts = ProgressiveOptions(start_steps=2, target_steps=1, round_steps=(2,), batch_size=8, ckpt_every=1)
    distill_progressive(str(teacher), out, opts, progress=False, log=lines.append)
    return lines


def test_a_kill_between_the_checkpoint_files_never_passes_a_stale_model_for_a_finished_stage(
        tmp_path, teacher_file, monkeypatch):
    """The model file is written first and the state (the checkpoint's commit point) last; a stage is done only
    when its model was written at its state's step, so a kill between the two renames is resumed, not skipped."""
    from distill import training
    from distill.checkpoint import load_tensors, read_metadata, save_tensors
    from distill.distillation import run_done

    model, state = training.MODEL_FILE, training.STATE_FILE
    # Killed after the last model file's rename, before the state's: the state is still the previous checkpoint's.
    real_save = training.save_tensors

    def killed_before_the_state(path, tensors, metadata):
        if path.name == state and metadata["step"] == 2:
            raise KeyboardInterrupt  # the kill
        real_save(path, tensors, metadata)

    monkeypatch.setattr(training, "save_tensors", killed_before_the_state)
    with pytest.raises(KeyboardInterrupt):
        _tiny_progressive(teacher_file, tmp_path)
    monkeypatch.setattr(training, "save_tensors", real_save)
    stage = tmp_path / "steps-1"
    assert read_metadata(stage / model)["step"] == 2 and read_metadata(stage / state)["step"] == 1
    assert not run_done(stage, 2)
    assert any("resuming" in line for line in _tiny_progressive(teacher_file, tmp_path))
    final, final_meta = load_tensors(stage / model)
    final = {k: v.clone() for k, v in final.items()}  # not the file's memory map: the file is overwritten below
    assert final_meta["step"] == read_metadata(stage / state)["step"] == 2 and run_done(stage, 2)

    # A model file that does not read, or a state at the last step beside an older model (what the former write
    # order could leave), is not done either: the same command resumes and rewrites the model from the state.
    (stage / model).write_bytes(b"half a model")
    assert not run_done(stage, 2)
    save_tensors(stage / model, {k: v + 1 for k, v in final.items()}, {**final_meta, "step": 1})
    assert not run_done(stage, 2)
    assert any("resuming" in line for line in _tiny_progressive(teacher_file, tmp_path))
    rewritten, meta = load_tensors(stage / model)
    assert meta["step"] == 2 and run_done(stage, 2)
    assert rewritten.keys() == final.keys() and all(torch.equal(rewritten[k], final[k]) for k in final)


def _write_model(path: Path, **changes) -> None:
    net = UNet(UNetConfig(image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          num_classes=10))
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    meta = {"format": "distill.model/1", "model": {"arch": "unet", "config": net.config.to_dict()},
            "diffusion": {"schedule": {"name": "cosine", "logsnr_min": -20.0, "logsnr_max": 20.0},
                          "prediction": "v", "time_input": "t1000"}, "data": {"spec": "digits"}}
    if changes.pop("nan", False):
        tensors["conv_in.weight"][0, 0, 0, 0] = float("nan")
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})


@pytest.mark.parametrize("change,needle,publish_repairs", [
    ({"nan": True}, "hold NaN or Inf", False),
    ({"diffusion": None}, "incomplete metadata", False),
    ({"diffusion": {"schedule": {"name": "cosine"}, "prediction": "v"}}, "missing 'time_input'", False),
    ({"card": {"guidance": float("nan")}}, "finite", True),  # publish records a new, finite --guidance
])
def test_model_files_are_validated_when_read_and_when_published(tmp_path, distill_main, change, needle,
                                                                 publish_repairs):
    bad = tmp_path / "bad.safetensors"
    _write_model(bad, **change)
    _one_line_error(distill_main("sample", bad, "--steps", "1", "--seeds", "0", "--out", tmp_path / "s"), 2, needle)
    assert not (tmp_path / "s").exists()
    dest = tmp_path / "published.safetensors"
    res = distill_main("teacher", "publish", bad, dest)
    if publish_repairs:
        assert res.returncode == 0 and dest.exists()
    else:
        _one_line_error(res, 2, needle)
        assert not dest.exists()


def test_publish_refuses_a_non_finite_guidance_weight(tmp_path, distill_main):
    good = tmp_path / "good.safetensors"
    _write_model(good)
    dest = tmp_path / "published.safetensors"
    for w in ("nan", "inf"):
        _one_line_error(distill_main("teacher", "publish", good, dest, "--guidance", w), 2, "--guidance")
    assert not dest.exists()
    assert distill_main("teacher", "publish", good, dest, "--guidance", "0.5").returncode == 0


# -- data parallel ----------------------------------------------------------------------------------------------


def test_two_processes_draw_different_noise(tmp_path):
    """``accelerate launch`` with two CPU processes: each rank's loss records its noise, timesteps, label-drop draws
    and global RNG; the data shards differ by construction, the draws must too."""
    import socket

    with socket.socket() as s:  # a free port, not accelerate's fixed default (another run may hold it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--main_process_port", str(port),
                          "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "tests" / "dp_probe.py"),
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, (res.stdout[-1000:], res.stderr[-3000:])
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for key in ("t", "eps", "drop", "global", "batch"):
        assert r0[key] != r1[key], key
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_a_staged_folder_has_one_writer_and_survives_a_kill_in_its_swap(tmp_path):
    """Artifacts (exports, engines, chains) are written through staged_dir: a second writer of the same folder gets
    one line; a process killed between the swap's two renames leaves the old artifact as .NAME.old, which the next
    writer restores before anything else (so a failing next write still leaves the good one)."""
    out = tmp_path / "export"
    with staged_dir(out) as stage:
        (stage / "model.onnx").write_text("v1")
        with pytest.raises(UsageError, match=r"another distill process \(pid \d+\) is writing it"):
            with staged_dir(out):
                pytest.fail("a second writer entered the folder")
    assert (out / "model.onnx").read_text() == "v1"
    out.rename(tmp_path / ".export.old")  # killed after the first rename of the next swap
    (tmp_path / ".export.x1y2.stage").mkdir()  # and the staging folder of a writer killed earlier
    with pytest.raises(RuntimeError):
        with staged_dir(out):
            raise RuntimeError("the next export fails")
    assert (out / "model.onnx").read_text() == "v1"
    assert not list(tmp_path.glob("*.stage")) and not (tmp_path / ".export.old").exists()
    with staged_dir(out) as stage:
        (stage / "model.onnx").write_text("v2")
    assert (out / "model.onnx").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == [
        ".export.lock", "export"]
