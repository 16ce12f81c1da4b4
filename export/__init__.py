"""Export of denoisers: ONNX, FP16 / INT8 graphs, TensorRT engines and runtime backends."""
