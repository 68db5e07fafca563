"""sdonnx: Stable Diffusion on ONNX Runtime, without PyTorch at run time."""
