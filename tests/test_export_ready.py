"""The denoiser as export and distillation use it: traceable, fp32 time math, guidance as an input, tensor steps."""

import math

import numpy as np
import pytest
import torch

from distill.checkpoint import load_denoiser
from distill.denoiser import Cond, Denoiser, DenoiserGraph
from distill.errors import UsageError
from distill.models.unet import UNet, UNetConfig, with_guidance_embedding
from distill.oracles import GaussianDenoiser, example_gaussian
from distill.parameterization import consistency_scalings
from distill.samplers import clean_alpha_sigma, ddim_step, dpmpp_2m_step, generate, heun_step
from distill.schedules import CosineSchedule, DiscreteSchedule, interp


def _tiny_denoiser(schedule, guidance_embed=False, consistency=None):
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                          num_classes=10, guidance_embed=guidance_embed))
    for p in net.parameters():  # zero-initialised output layers would make every check trivially pass
        torch.nn.init.normal_(p, std=0.2)
    return Denoiser(net, schedule, "v", "t1000", null_label=10, guidance_input=guidance_embed,
                    consistency=consistency).eval()


def _rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# One combination (each costs ~10-20 s on a 2-core machine) that holds every part a graph can have: a guided
# consistency student (boundary-condition scalings, the two-branch guidance) on the discrete DDPM table; the plain
# and guided teacher on both schedules: python -m benchmarks.export_check
@pytest.mark.parametrize("schedule,guided,consistency", [
    (DiscreteSchedule("linear"), True, {"sigma_min": 0.002, "sigma_data": 0.5})], ids=["discrete-guided-consistency"])
def test_denoiser_exports_to_onnx_and_compiles_without_graph_breaks(tmp_path, schedule, guided, consistency):
    import onnx
    import onnxruntime as ort

    graph = DenoiserGraph(_tiny_denoiser(schedule, consistency=consistency), labels=True, guided=guided).eval()
    example = graph.example_inputs(7, (1, 8, 8))
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = [{0: batch}] * len(example)
    # torch.export with a dynamic batch (raises on any specialisation of the batch size)
    exported = torch.export.export(graph, example, dynamic_shapes=dynamic)
    # ONNX through the dynamo exporter, checker-clean, no float64 anywhere; it is handed the dynamic-batch program
    # just exported (what it would otherwise trace again itself)
    path = tmp_path / "den.onnx"
    torch.onnx.export(exported, (), input_names=graph.input_names, output_names=["x0"],
                      dynamo=True, verbose=False).save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    dtypes = {i.data_type for i in model.graph.initializer} | {v.type.tensor_type.elem_type for v in values}
    assert onnx.TensorProto.DOUBLE not in dtypes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compiled = torch.compile(graph, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    unexported = exported.module()
    for b in (1, 7):
        inputs = graph.example_inputs(b, (1, 8, 8))
        with torch.no_grad():
            ref = graph(*inputs)
            assert torch.allclose(unexported(*inputs), ref, atol=1e-6)
            assert torch.equal(compiled(*inputs), ref)
        out = session.run(None, {n: v.numpy() for n, v in zip(graph.input_names, inputs)})[0]
        assert _rel_err(out, ref.numpy()) <= 1e-5


def test_guided_graph_equals_the_two_branch_formula():
    den = _tiny_denoiser(CosineSchedule())
    graph = DenoiserGraph(den, labels=True, guided=True)
    x, t, labels, w = graph.example_inputs(5, (1, 8, 8))
    with torch.no_grad():
        cond = den(x, t, Cond(labels))
        uncond = den(x, t, Cond(torch.full_like(labels, 10)))
        expected = cond + w[:, None, None, None] * (cond - uncond)
        assert torch.allclose(graph(x, t, labels, w), expected, atol=1e-5)
        # w = 0 entries give exactly the conditional output; a tensor always takes the guided path
        assert torch.allclose(den(x, t, Cond(labels, torch.zeros(5))), cond, atol=1e-6)


class _Spy(torch.nn.Module):
    """Records what the network receives."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t_in, labels=None, w=None):
        self.calls.append({"batch": x.shape[0], "t_in": t_in, "w": w})
        return self.net(x, t_in, labels, w)


def test_time_input_stays_fp32_when_weights_and_x_are_bf16():
    den = _tiny_denoiser(DiscreteSchedule("linear"))
    den.net = _Spy(den.net)
    den = den.to(torch.bfloat16)
    assert den.schedule.logsnr_table.dtype == torch.float32  # the cast did not round the table
    t = torch.tensor([0.4567, 0.0123])
    x = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = den(x, t, Cond(torch.tensor([1, 2])))
    t_in = den.net.calls[-1]["t_in"]
    assert out.dtype == torch.bfloat16 and t_in.dtype == torch.float32
    assert torch.allclose(t_in, torch.tensor([456.7, 12.3]), atol=1e-3)  # bf16 would give 456 and 12.3125


def test_discrete_table_is_a_device_buffer_read_by_index_arithmetic():
    s = DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    module = torch.nn.Module()
    module.schedule = s
    module.to("meta").half()  # moves follow the model, casts do not
    assert s.logsnr_table.device.type == "meta" and s.logsnr_table.dtype == torch.float32
    s = DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.rand(2000, dtype=torch.float64)
    ts, lam = s.table()
    reference = torch.from_numpy(np.interp(t.numpy(), ts.numpy(), lam.numpy()))  # an independent search
    assert torch.allclose(s.logsnr(t), reference, atol=1e-12)
    assert torch.allclose(s.logsnr(t.float()).double(), reference, atol=2e-5)
    assert torch.allclose(s.t_of_logsnr(reference), t, atol=1e-9)
    assert torch.allclose(interp(t, ts, lam), reference, atol=1e-12)


def test_guidance_student_starts_as_its_teacher_and_gets_w_in_one_pass():
    teacher = load_denoiser("mnist")
    student_net = with_guidance_embedding(teacher.net)
    g = torch.Generator().manual_seed(0)
    x, t, labels = torch.randn(3, 1, 32, 32, generator=g), torch.tensor([100.0, 500.0, 900.0]), torch.tensor([1, 5, 9])
    with torch.no_grad():
        expected = teacher.net(x, t, labels)
        for w in (0.0, 1.0, 3.5):
            assert torch.equal(student_net(x, t, labels, torch.full((3,), w)), expected)
    spy = _Spy(student_net)
    student = Denoiser(spy, teacher.schedule, teacher.prediction, teacher.time_input, 10, guidance_input=True)
    tt = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        out = student(x, tt, Cond(labels, 2.0))
        assert torch.allclose(out, teacher(x, tt, Cond(labels)), atol=1e-6)  # untrained: the conditional output
    assert len(spy.calls) == 1 and spy.calls[0]["batch"] == 3
    assert torch.equal(spy.calls[0]["w"], torch.full((3,), 2.0))
    student(x, tt, Cond(None, 2.0))
    assert torch.equal(spy.calls[-1]["w"], torch.zeros(3))  # no labels, no guidance
    # the teacher itself runs two branches in one batched call
    teacher.net = _Spy(teacher.net)
    teacher(x, tt, Cond(labels, 2.0))
    assert [c["batch"] for c in teacher.net.calls] == [6]


def test_guidance_student_round_trips_through_a_model_file(tmp_path):
    from distill.checkpoint import save_model

    den = _tiny_denoiser(CosineSchedule(), guidance_embed=True)
    meta = {"model": {"arch": "unet", "config": den.net.config.to_dict()},
            "diffusion": {"schedule": den.schedule.config(), "prediction": "v", "time_input": "t1000"}}
    save_model(tmp_path / "s.safetensors", den.net, meta)
    loaded = load_denoiser(tmp_path / "s.safetensors")
    assert loaded.guidance_input
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    cond = Cond(torch.tensor([1, 2]), torch.tensor([0.5, 3.0]))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), den(x, t, cond))


def _alpha_sigma(schedule, t):
    return clean_alpha_sigma(schedule, t)


def test_step_formulas_take_per_sample_tensors():
    s = CosineSchedule()
    g = torch.Generator().manual_seed(3)
    x, x0, x0b, x0p = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.9, 0.6, 0.3, 0.05], dtype=torch.float64)
    u = torch.tensor([0.7, 0.4, 0.0, 0.02], dtype=torch.float64)  # one step ends at clean data
    a_t, s_t = _alpha_sigma(s, t)
    a_s, s_s = _alpha_sigma(s, u)
    assert float(a_s[2]) == 1.0 and float(s_s[2]) == 0.0
    h_prev = torch.full((4,), 0.4, dtype=torch.float64)
    x_e = ddim_step(x, x0, a_t, s_t, a_s, s_s)
    heun = heun_step(x, x0, x_e, x0b, a_t, s_t, a_s.clamp(max=0.99), s_s.clamp(min=0.1))
    dpm, h = dpmpp_2m_step(x, x0, a_t, s_t, a_s, s_s, x0p, h_prev)
    for i in range(4):
        f = [float(v[i]) for v in (a_t, s_t, a_s, s_s)]
        assert torch.allclose(x_e[i], ddim_step(x[i], x0[i], *f), atol=1e-12)
        fh = f[:2] + [min(f[2], 0.99), max(f[3], 0.1)]
        x_ei = ddim_step(x[i], x0[i], *f)
        assert torch.allclose(heun[i], heun_step(x[i], x0[i], x_ei, x0b[i], *fh), atol=1e-12)
        ref, _ = dpmpp_2m_step(x[i], x0[i], *f, x0p[i], float(h_prev[i]))
        assert torch.allclose(dpm[i], ref, atol=1e-12)
    assert torch.equal(dpm[2], x0[2])  # a step to sigma = 0 returns the data estimate


def test_heun_step_is_the_trapezoid_rule_on_the_ve_ode():
    # Hand calculation on the VE-equivalent ODE dx/dsigma = (x - D) / sigma, alpha = 1: sigma 2 -> 1, x = 3,
    # D(x, 2) = 1, Euler: x_e = 3 + (1 - 2)(3 - 1)/2 = 2, D(x_e, 1) = 0.5, d' = (2 - 0.5)/1 = 1.5,
    # Heun: 3 + (1 - 2)(1 + 1.5)/2 = 1.75.
    x, d_cur, d_next = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.5])
    x_e = ddim_step(x, d_cur, 1.0, 2.0, 1.0, 1.0)
    assert torch.allclose(x_e, torch.tensor([2.0]))
    assert torch.allclose(heun_step(x, d_cur, x_e, d_next, 1.0, 2.0, 1.0, 1.0), torch.tensor([1.75]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consistency_boundary_condition_holds_exactly(dtype):
    sigma_min = 0.002
    x, f = torch.randn(6, 3, dtype=dtype), torch.randn(6, 3, dtype=dtype)
    sigma = torch.full((6, 1), sigma_min, dtype=dtype)
    c_skip, c_out, c_in = consistency_scalings(sigma, sigma_min)
    assert torch.equal(c_skip * x + c_out * f, x)  # f(x, sigma_min) = x to float precision
    c_skip, c_out, c_in = consistency_scalings(sigma_min, sigma_min)
    assert (c_skip, c_out) == (1.0, 0.0)
    # Song et al. (2023), Appendix C, at sigma = 1 (sigma_data = 0.5), by hand
    c_skip, c_out, c_in = consistency_scalings(1.0, sigma_min)
    assert math.isclose(c_skip, 0.25 / (0.998**2 + 0.25)) and math.isclose(c_out, 0.998 * 0.5 / 1.25**0.5)
    assert math.isclose(c_in, 1 / 1.25**0.5)


def test_samplers_take_the_schedule_explicitly_so_a_backend_can_stand_in():
    mu, cov = example_gaussian()
    schedule = CosineSchedule()
    oracle = GaussianDenoiser(schedule, mu, cov)

    def backend(x_t, t, cond):  # a bare callable, as an ONNX Runtime session wrapper would be: no .schedule
        return oracle(x_t, t, cond)

    for sampler in ("ddim", "heun", "dpmpp_2m", "ddpm"):
        ref = generate(oracle, (3,), range(8), sampler=sampler, steps=6, dtype=torch.float64)
        out = generate(backend, (3,), range(8), sampler=sampler, steps=6, dtype=torch.float64, schedule=schedule)
        assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="schedule"):
        generate(backend, (3,), range(2), sampler="ddim", steps=2)
    with pytest.raises(UsageError, match="eta"):
        generate(oracle, (3,), range(2), sampler="heun", steps=2, eta=0.5)


def test_a_new_guidance_students_w_embedding_is_exactly_zero_at_w_0_whatever_its_weights():
    """The w embedding is gated by w: however training moves its weights, w = 0 gives the network without it (a
    student made before the gate, whose config lacks it, keeps its ungated embedding)."""
    from dataclasses import replace

    from distill.models.unet import UNet, UNetConfig, with_guidance_embedding

    torch.manual_seed(0)
    base = UNet(UNetConfig(image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                           num_classes=3)).eval()
    for p in base.parameters():  # untrained blocks' zero-initialised outputs would hide the embedding
        torch.nn.init.normal_(p, std=0.2)
    student = with_guidance_embedding(base).eval()
    assert student.config.guidance_gate and student.config.to_dict()["guidance_gate"]
    assert "guidance_gate" not in base.config.to_dict()  # a config stored before the gate compares equal
    for p in student.guidance_mlp.parameters():
        torch.nn.init.normal_(p, std=1.0)  # "trained" far from its zero start
    x, t, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 500.0), torch.arange(4) % 3
    with torch.no_grad():
        assert torch.equal(student(x, t, labels, torch.zeros(4)), base(x, t, labels))
        assert not torch.allclose(student(x, t, labels, torch.ones(4)), base(x, t, labels))
        old = UNet(replace(student.config, guidance_gate=False)).eval()
        old.load_state_dict(student.state_dict())
        assert not torch.allclose(old(x, t, labels, torch.zeros(4)), base(x, t, labels))
