"""Run by tests/test_run_safety.py under ``accelerate launch --num_processes 2``: one training step of a tiny digits
teacher, with a loss that records what each process drew (noise, timesteps, label-drop mask, global RNG)."""

import json
import sys
from pathlib import Path

import torch

from distill.losses import DiffusionLoss
from distill.teacher import build_teacher
from distill.training import Trainer, close_process_group


class RecordingLoss(DiffusionLoss):
    def forward(self, model, x0, labels, generator):
        state = generator.get_state()
        draws = {"t": torch.rand(4, generator=generator).tolist(), "eps": torch.randn(4, generator=generator).tolist(),
                 "drop": torch.rand(4, generator=generator).tolist(), "global": torch.rand(2).tolist(),
                 "batch": x0.flatten(1).sum(1).tolist()[:4]}
        generator.set_state(state)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(draws))
        return super().forward(model, x0, labels, generator)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    run = build_teacher(data_spec="digits", image_size=None, unconditional=False, schedule="cosine", prediction="v",
                        channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="", dropout=0.0, label_dropout=0.2,
                        train=dict(steps=1, batch_size=8, warmup=0))
    from distill.denoiser import Denoiser
    from distill.models.unet import UNet

    torch.manual_seed(0)
    model = Denoiser(UNet(run.unet), run.schedule, "v", "t1000", null_label=10)
    Trainer(model, RecordingLoss(0.2), run.data, run.train, out / "run", run.metadata()).run(progress=False)
    close_process_group()
