"""fp16 / int8 / int4 variants of exported folders through ONNX Runtime's own tooling (issue: quantization)."""
