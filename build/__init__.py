"""Build scripts for the face-fusion service: ONNX export, TensorRT engine build, operator checks."""
