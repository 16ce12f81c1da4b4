"""The graph rules of the GPU path, each on a hand-built graph that breaks only it: the FP16 graph's fp32 path
(no fp32 -> fp16 -> fp32 round trip, no fp16 weight read by a kept node, no fp16 tensor on the time path) and
TensorRT's INT8 Q/DQ rules and placement; then the same rules on the tiny teacher's real exports."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from export.precision import fp16_violations, qdq_placement, qdq_violations, to_fp16

# -- FP16 ---------------------------------------------------------------------------------------------------------


def _time_graph(body: list, inits: list) -> onnx.ModelProto:
    """x_t, t -> y: ``body`` computes ``emb`` from t (the conditioning path); y = x_t + emb."""
    nodes = [*body, helper.make_node("Add", ["x_t", "emb"], ["y"], name="add_image")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x_t", TP.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("t", TP.FLOAT, [2, 1])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [2, 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _cast(src, dst, to, name):
    return helper.make_node("Cast", [src], [dst], to=to, name=name)


W32 = numpy_helper.from_array(np.full((1, 4), 1000.0, np.float32), "w")
W16 = numpy_helper.from_array(np.full((1, 4), 1000.0, np.float16), "w")


def test_an_fp32_time_path_passes():
    body = [helper.make_node("Mul", ["t", "w"], ["phase"], name="mul"), helper.make_node("Sin", ["phase"], ["emb"],
                                                                                          name="sin")]
    assert fp16_violations(_time_graph(body, [W32]), "x_t", ["mul", "sin"]) == []


def test_a_weight_shared_by_a_kept_and_an_fp16_node_gives_each_its_own_precision():
    """The converter leaves a weight fp32 when a kept node shares it; the fp16 node then gets an fp16 copy (else
    ONNX Runtime refuses the graph: a Mul bound to two types)."""
    import onnxruntime as ort

    nodes = [helper.make_node("Mul", ["t", "w"], ["phase"], name="mul_t"),
             helper.make_node("Sin", ["phase"], ["emb"], name="sin"),
             helper.make_node("Mul", ["x_t", "w"], ["xw"], name="mul_x"),
             helper.make_node("Add", ["xw", "emb"], ["y"], name="add_image")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x_t", TP.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("t", TP.FLOAT, [2, 1])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [2, 4])],
                              initializer=[numpy_helper.from_array(np.full((1, 4), 3.0, np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    half, info = to_fp16(model)
    assert info["cleaned"]["weights_copied_fp16"] == 1
    x, t = np.ones((2, 4), np.float32), np.full((2, 1), 0.5, np.float32)
    y = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x_t": x, "t": t})[0]
    assert np.allclose(y, 3.0 + np.sin(1.5), atol=1e-3)


def test_a_cast_pair_on_the_fp32_path_is_found():
    body = [helper.make_node("Mul", ["t", "w"], ["phase"], name="mul"), _cast("phase", "p16", TP.FLOAT16, "c16"),
            _cast("p16", "p32", TP.FLOAT, "c32"), helper.make_node("Sin", ["p32"], ["emb"], name="sin")]
    bad = fp16_violations(_time_graph(body, [W32]), "x_t", ["mul", "sin"])
    assert any("c16 -> c32: fp32 -> fp16 -> fp32 round trip of phase" in b for b in bad)


def test_an_fp16_weight_read_by_a_kept_node_is_found():
    body = [_cast("w", "w32", TP.FLOAT, "cw"), helper.make_node("Mul", ["t", "w32"], ["phase"], name="mul"),
            helper.make_node("Sin", ["phase"], ["emb"], name="sin")]
    bad = fp16_violations(_time_graph(body, [W16]), "x_t", ["mul", "sin"])
    assert bad == ["mul (Mul, kept fp32) reads the fp16 weight w"]


def test_an_fp16_tensor_on_the_time_path_is_found():
    body = [_cast("t", "t16", TP.FLOAT16, "ct"), helper.make_node("Mul", ["t16", "w"], ["p16"], name="mul16"),
            _cast("p16", "phase", TP.FLOAT, "cp"), helper.make_node("Sin", ["phase"], ["emb"], name="sin")]
    bad = fp16_violations(_time_graph(body, [W16]), "x_t", ["sin"])
    assert any("ct (Cast): fp16 tensor t16 on the conditioning path" in b for b in bad)
    assert any("mul16 (Mul): fp16 tensor p16 on the conditioning path" in b for b in bad)


def test_an_fp16_tensor_leaving_the_time_path_for_the_image_is_allowed():
    nodes = [helper.make_node("Sin", ["t"], ["emb"], name="sin"), _cast("emb", "e16", TP.FLOAT16, "ce"),
             _cast("x_t", "x16", TP.FLOAT16, "cx"), helper.make_node("Add", ["x16", "e16"], ["y16"], name="add"),
             _cast("y16", "y", TP.FLOAT, "cy")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x_t", TP.FLOAT, [2, 1]),
                                           helper.make_tensor_value_info("t", TP.FLOAT, [2, 1])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [2, 1])])
    assert fp16_violations(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), "x_t",
                           ["sin"]) == []


def test_the_fp16_export_keeps_its_fp32_path_fp32_where_the_converter_alone_did_not(tmp_path, teacher_file):
    """The tiny teacher's real graph: onnxconverter-common alone breaks all three rules; ``to_fp16`` none, and
    every tensor from t to the time embedding's Sin/Cos is fp32."""
    import warnings

    from onnxconverter_common import float16

    from export.onnx import ExportOptions, export_onnx
    from export.precision import FP16_KEEP_OPS, _float_types, conditioning_nodes

    export_onnx(str(teacher_file), tmp_path / "fp32", ExportOptions(), log=lambda *a: None)
    fp32 = onnx.load(str(tmp_path / "fp32/model.onnx"))
    half, info = to_fp16(fp32)
    assert info["cleaned"]["round_trips_removed"] > 0 and info["cleaned"]["weights_restored_fp32"] > 0
    assert fp16_violations(half, "x_t", info["fp32_nodes"]) == []
    ops = sorted(set(FP16_KEEP_OPS) | set(float16.DEFAULT_OP_BLOCK_LIST))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = float16.convert_float_to_float16(onnx.load(str(tmp_path / "fp32/model.onnx")), keep_io_types=True,
                                               op_block_list=ops, node_block_list=conditioning_nodes(fp32, "x_t"))
    bad = fp16_violations(raw, "x_t", info["fp32_nodes"])
    assert any("round trip" in b for b in bad) and any("reads the fp16 weight" in b for b in bad)
    assert any("on the conditioning path" in b for b in bad)
    # the time path, end to end: every tensor feeding Sin / Cos, back to t, is fp32
    types, producer = _float_types(half), {o: n for n in half.graph.node for o in n.output}
    todo = [i for n in half.graph.node if n.op_type in ("Sin", "Cos") for i in n.input]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if types.get(name) in (TP.FLOAT16,):
            pytest.fail(f"{name} on the time path is fp16")
        if name in producer:
            todo.extend(producer[name].input)
    assert "t" in seen
    try:  # polygraphy's linter (ONNX Runtime underneath) finds nothing in the FP16 graph either
        import onnx_graphsurgeon  # noqa: F401
        import polygraphy  # noqa: F401
    except ImportError:
        return
    from export.tensorrt import polygraphy_lint

    onnx.save(half, str(tmp_path / "fp16.onnx"))
    assert polygraphy_lint(tmp_path / "fp16.onnx")["passed"]


# -- INT8 (TensorRT's Q/DQ rules) -----------------------------------------------------------------------------


ZERO, SCALE = np.int8(0), np.float32(0.1)


def _qdq_conv(*, channels=3, x_zero=ZERO, x_scale=SCALE, x_axis=None, w_axis=0, w_scales=None,
              scale_dtype=np.float32, x_dtype=TP.FLOAT, layer="Conv", w_zero_dtype=np.int8,
              computed_scale=False, external=None):
    """x (image) -> Q -> DQ -> layer(weight through Q/DQ) -> y, one defect at a time."""
    c = channels
    w = np.random.default_rng(0).standard_normal((c, 2, 1, 1) if layer == "Conv" else (2, c)).astype(np.float32)
    ws = np.full(c, 0.05, scale_dtype) if w_scales is None else w_scales
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.asarray(ws), "w_scale"),
             numpy_helper.from_array(np.zeros(np.asarray(ws).shape, w_zero_dtype), "w_zero")]
    nodes = []
    if computed_scale:
        nodes.append(helper.make_node("Abs", ["x_scale_in"], ["x_scale"], name="abs"))
        inits.append(numpy_helper.from_array(np.asarray(x_scale, scale_dtype), "x_scale_in"))
    else:
        inits.append(numpy_helper.from_array(np.asarray(x_scale, dtype=scale_dtype), "x_scale"))
    q_inputs = ["x", "x_scale"]
    if x_zero is not None:
        inits.append(numpy_helper.from_array(np.asarray(x_zero), "x_zero"))
        q_inputs.append("x_zero")
    axis = {} if x_axis is None else {"axis": x_axis}
    nodes += [helper.make_node("QuantizeLinear", q_inputs, ["xq"], name="q_x", **axis),
              helper.make_node("DequantizeLinear", ["xq", *q_inputs[1:]], ["xd"], name="dq_x", **axis),
              helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zero"], ["wq"], name="q_w", axis=w_axis),
              helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zero"], ["wd"], name="dq_w", axis=w_axis)]
    if layer == "Conv":
        nodes.append(helper.make_node("Conv", ["xd", "wd"], ["y"], name="layer"))
        shapes = ([1, 2, 4, 4], [1, c, 4, 4])
    elif layer == "Gemm":
        nodes.append(helper.make_node("Gemm", ["xd", "wd"], ["y"], name="layer"))
        shapes = ([1, 2], [1, c])
    else:
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"], name="layer"))
        shapes = ([1, 2], [1, c])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_dtype, shapes[0])],
                              [helper.make_tensor_value_info("y", x_dtype, shapes[1])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    if external is not None:
        from onnx.external_data_helper import convert_model_to_external_data

        convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin",
                                       size_threshold=0)
        onnx.save(model, str(external / "model.onnx"))
        model = onnx.load(str(external / "model.onnx"), load_external_data=False)
    return model


def test_a_well_formed_qdq_graph_passes_every_rule(tmp_path):
    for layer in ("Conv", "Gemm", "MatMul"):
        model = _qdq_conv(layer=layer, w_axis=0 if layer == "Conv" else 1)
        assert qdq_violations(model) == [] and qdq_placement(model) == []
    assert qdq_violations(_qdq_conv(external=tmp_path), tmp_path) == []  # external data read from the folder


@pytest.mark.parametrize("defect, needle", [
    ({"x_zero": None}, "no zero point (QuantizeLinear then makes UINT8"),
    ({"x_zero": np.uint8(128)}, "UINT8 quantization"),
    ({"x_zero": np.int8(3)}, "non-zero zero point"),
    ({"x_scale": np.float32(-0.1)}, "scale <= 0"),
    ({"scale_dtype": np.float16}, "scale is float16, the tensor it quantizes is float32"),
    ({"x_scale": np.array([0.1], np.float32), "x_zero": np.array([0], np.int8)}, "per-tensor scale of shape [1]"),
    ({"x_zero": np.array([0], np.int8)}, "zero point shape [1] differs from the scale's []"),
    ({"x_scale": np.full(2, 0.1, np.float32), "x_zero": np.zeros(2, np.int8), "x_axis": 1},
     "per-channel quantization of an activation"),
    ({"w_axis": 1}, "per-channel axis 1 on a Conv weight (want 0)"),
    ({"layer": "Gemm", "w_axis": 0}, "per-channel axis 0 on a Gemm weight (want 1)"),
    ({"layer": "MatMul", "w_axis": 0}, "per-channel axis 0 on a MatMul weight (want 1)"),
    ({"w_scales": np.full(2, 0.05, np.float32)}, "2 scales for 3 output channels"),
    ({"w_zero_dtype": np.int32}, "INT32 (bias) dequantization"),
    ({"computed_scale": True}, "is computed, not a constant"),
])
def test_each_qdq_rule_finds_its_defect(defect, needle):
    bad = qdq_violations(_qdq_conv(**defect))
    assert any(needle in b for b in bad), bad


def test_a_one_channel_weight_may_have_a_per_channel_scale_of_one():
    assert qdq_violations(_qdq_conv(channels=1)) == []


def test_an_excluded_layer_reads_the_float_activation_not_a_shared_quantized_one():
    """ONNX Runtime shares one activation Q/DQ among a tensor's consumers; a float (excluded) convolution beside a
    quantized one must read the float tensor."""
    from export.precision import quantize_weighted_inputs_only

    model = _qdq_conv()
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w_float"))
    g.node.append(helper.make_node("Conv", ["xd", "w_float"], ["y2"], name="float_layer"))
    g.output.append(helper.make_tensor_value_info("y2", TP.FLOAT, [1, 3, 4, 4]))
    assert any("a layer whose weight is not quantized" in b for b in qdq_placement(model))
    assert quantize_weighted_inputs_only(model) == 1
    assert next(n for n in g.node if n.name == "float_layer").input[0] == "x"
    assert next(n for n in g.node if n.name == "layer").input[0] == "xd" and qdq_placement(model) == []


def test_qdq_data_in_missing_external_data_is_reported(tmp_path):
    model = _qdq_conv(external=tmp_path)
    (tmp_path / "weights.bin").unlink()
    assert any("external data that cannot be read" in b for b in qdq_violations(model, tmp_path))


def test_placement_finds_output_and_attention_quantizers():
    model = _qdq_conv()
    g = model.graph  # the quantized activation also feeds a Relu: a quantizer not only on a layer's input
    g.node.append(helper.make_node("Relu", ["xd"], ["r"], name="relu"))
    assert any("feeds relu (Relu), not a weighted layer's input" in b for b in qdq_placement(model))
    model = _qdq_conv(layer="MatMul", w_axis=1)  # B an activation (attention's q @ k): quantized
    model.graph.node[-1].input[1] = "xd"
    assert any("activation-activation MatMul (attention) is quantized" in b for b in qdq_placement(model))
