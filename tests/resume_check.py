"""The kill-and-resume check the training methods' tests share."""

import torch
from safetensors.torch import load_file

from distill.checkpoint import read_metadata


def killed_run_resumes(distill_main, monkeypatch, tmp_path, command: list, loss_cls, kill_at: int,
                       saved_step: int) -> dict:
    """Run ``command`` (a distill command line without ``--out``) into ``whole``; run it into ``cut`` with
    ``loss_cls.forward`` interrupted (Ctrl-C) at its ``kill_at``-th call, which must leave the checkpoint of step
    ``saved_step``; run it again there, which must resume and end with the same training state (every tensor).
    Returns that state (tensors by name)."""
    code, _, err = distill_main(*command[:2], "--out", tmp_path / "whole", *command[2:])
    assert code == 0, err
    calls = {"n": 0}
    original = loss_cls.forward

    def dying(self, *a):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt
        return original(self, *a)

    monkeypatch.setattr(loss_cls, "forward", dying)
    code, _, err = distill_main(*command[:2], "--out", tmp_path / "cut", *command[2:])
    assert code == 130 and read_metadata(tmp_path / "cut" / "train_state.safetensors")["step"] == saved_step
    monkeypatch.setattr(loss_cls, "forward", original)
    code, stdout, err = distill_main(*command[:2], "--out", tmp_path / "cut", *command[2:])
    assert code == 0 and "resuming" in stdout, err
    a = load_file(tmp_path / "whole" / "train_state.safetensors")
    b = load_file(tmp_path / "cut" / "train_state.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return a
