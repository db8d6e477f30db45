"""wanrt.export: exporters (ONNX, TensorRT, AOTInductor)."""
