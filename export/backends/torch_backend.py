"""The torch backends: the module itself (eager) or ``torch.compile`` of it, in fp32 or under bf16 / fp16 autocast.

``compile`` is the strongest plain-PyTorch path, the one every exported path is judged against: on a CPU, inductor
with freezing (weights folded into the kernels as constants, so the graph needs ``no_grad``); on a GPU,
``mode="reduce-overhead"``, i.e. CUDA graphs, which removes the per-call launch overhead that dominates a small
network at batch 1. One compiled graph per input signature (labels, ``w``) and batch size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.denoiser import Cond, Denoiser, DenoiserGraph
from export.backends import AUTOCAST, graph_inputs


class TorchBackend:
    """``denoiser`` run eagerly or compiled, at ``precision`` (fp32, or bf16 / fp16 autocast)."""

    kind = "denoiser"

    def __init__(self, denoiser: Denoiser, name: str = "eager", precision: str = "fp32", device: str = "cpu"):
        self.den, self.name, self.precision, self.device = denoiser.eval(), name, precision, device
        self.schedule = denoiser.schedule
        self.metadata = getattr(denoiser, "metadata", {})
        self.image_shape, self.num_classes = denoiser.image_shape, denoiser.num_classes
        self.guidance_input, self.null_label = denoiser.guidance_input, denoiser.null_label
        self._graphs: dict[tuple[bool, bool], torch.nn.Module] = {}
        self.device_type = torch.device(device).type

    def _compiled(self, labels: bool, guided: bool):
        key = (labels, guided)
        if key not in self._graphs:
            graph = DenoiserGraph(self.den, labels=labels, guided=guided).eval()
            if self.device_type == "cpu":
                # freezing for this graph only (an inductor option of this compile, not its process-wide config, so
                # no later compile in the same process inherits it)
                self._graphs[key] = torch.compile(graph, fullgraph=True, dynamic=False, options={"freezing": True})
            else:
                self._graphs[key] = torch.compile(graph, fullgraph=True, dynamic=False, mode="reduce-overhead")
        return self._graphs[key]

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor | float, cond: Cond | None = None) -> Tensor:
        dtype = AUTOCAST[self.precision]
        with torch.autocast(self.device_type, dtype or torch.bfloat16, enabled=dtype is not None):
            if self.name == "eager":
                return self.den(x_t, t, cond)
            cond = cond if cond is not None else Cond()
            labels = self.num_classes > 0
            guided = self.guidance_input or cond.guided
            inputs = graph_inputs(x_t, t, cond, labels=labels, guided=guided, null_label=self.null_label,
                                  source="the model")
            out = self._compiled(labels, guided)(*inputs)
        # CUDA graphs reuse their output buffer on the next replay; the sampler keeps this one across steps
        return out.clone() if self.device_type == "cuda" else out
