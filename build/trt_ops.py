"""ONNX operators that TensorRT 10.5's ONNX parser (onnx-tensorrt, as shipped in NGC 24.10) can import.

Source: onnx-tensorrt ``docs/operators.md`` at the 10.1-GA tag (the newest operator table published before 10.5),
plus the operator additions its ``docs/Changelog.md`` lists for 10.2-10.5:
  10.3: tensor ``axes`` input for Slice;  10.4: tensor ``axes`` for Pad, BlackmanWindow / HammingWindow /
  HannWindow;  10.5: real-valued STFT.
No operator was removed in 10.2-10.5. The parser documents opsets 9..20 for the default ONNX domain.

Why this exists: TensorRT cannot be installed on the development machines, so the op-type check is the part of
"will it build?" that can be answered without a GPU. It does not prove the build: some ops carry restrictions
(``RESTRICTIONS``) that depend on attributes or on which inputs are initializers.

Usage: python -m build.trt_ops model_repository/fusion/1/model.onnx   (exit 1 when an op is unsupported)
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import onnx

TENSORRT_VERSION = "10.5"
MIN_OPSET = 9
MAX_OPSET = 20  # highest default-domain opset the parser documents; newer opsets may still parse

# Default ONNX domain spellings; anything else (ai.onnx.ml, com.microsoft, custom) needs a TensorRT plugin.
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})

# Operator -> restriction ("" when none is documented). Restrictions are the parser's, quoted in short.
RESTRICTIONS: dict[str, str] = {
    "Abs": "", "Acos": "", "Acosh": "", "Add": "", "And": "", "ArgMax": "", "ArgMin": "",
    "Asin": "", "Asinh": "", "Atan": "", "Atanh": "",
    "AveragePool": "2D or 3D pooling only; dilations must be empty or all ones",
    "BatchNormalization": "",
    "BlackmanWindow": "",  # added in 10.4
    "Cast": "", "CastLike": "", "Ceil": "", "Celu": "", "Clip": "", "Concat": "",
    "Constant": "sparse_value, value_string and value_strings attributes are unsupported",
    "ConstantOfShape": "", "Conv": "", "ConvTranspose": "", "Cos": "", "Cosh": "",
    "CumSum": "axis must be an initializer",
    "DeformConv": "1D or 2D spatial input only; begin and end pads must match per axis",
    "DepthToSpace": "",
    "DequantizeLinear": "x_zero_point must be zero",
    "Div": "",
    "Dropout": "is_training must be an initializer that evaluates to False",
    "Einsum": "", "Elu": "", "Equal": "", "Erf": "", "Exp": "", "Expand": "",
    "EyeLike": "input must have static dimensions",
    "Flatten": "", "Floor": "", "Gather": "", "GatherElements": "", "GatherND": "", "Gelu": "", "Gemm": "",
    "GlobalAveragePool": "", "GlobalLpPool": "", "GlobalMaxPool": "", "Greater": "", "GreaterOrEqual": "",
    "GridSample": "input must be 4D",
    "GroupNormalization": "",
    "GRU": "bidirectional GRUs need the same activations in both directions",
    "HammingWindow": "", "HannWindow": "",  # added in 10.4
    "HardSigmoid": "", "HardSwish": "",
    "Hardmax": "the axis dimension of the input must be a build-time constant",
    "Identity": "",
    "If": "both branches' outputs must have the same rank and different names",
    "ImageScaler": "", "InstanceNormalization": "", "IsInf": "", "IsNaN": "",
    "LayerNormalization": "only the first output Y is supported",
    "LeakyRelu": "", "Less": "", "LessOrEqual": "", "Log": "", "LogSoftmax": "",
    "Loop": "scan output length cannot be dynamic; loop-carried shapes must not change across iterations",
    "LRN": "",
    "LSTM": "bidirectional LSTMs need the same activations in both directions; input_forget and layout must be 0",
    "LpNormalization": "",
    "LpPool": "dilations must be empty or all ones",
    "MatMul": "", "Max": "",
    "MaxPool": "2D or 3D pooling only; the Indices output is unsupported; dilations must be empty or all ones",
    "Mean": "", "MeanVarianceNormalization": "", "Min": "", "Mish": "", "Mod": "", "Mul": "", "Neg": "",
    "NonMaxSuppression": "", "NonZero": "", "Not": "",
    "OneHot": "depth must be a build-time constant",
    "Or": "",
    "Pad": "",  # tensor axes input supported since 10.4
    "ParametricSoftplus": "", "Pow": "", "PRelu": "",
    "QuantizeLinear": "y_zero_point must be 0",
    "RandomNormal": "seed is ignored", "RandomNormalLike": "seed is ignored",
    "RandomUniform": "seed is ignored", "RandomUniformLike": "seed is ignored",
    "Range": "", "Reciprocal": "",
    "ReduceL1": "axes must be an initializer", "ReduceL2": "axes must be an initializer",
    "ReduceLogSum": "axes must be an initializer", "ReduceLogSumExp": "axes must be an initializer",
    "ReduceMax": "axes must be an initializer", "ReduceMean": "axes must be an initializer",
    "ReduceMin": "axes must be an initializer", "ReduceProd": "axes must be an initializer",
    "ReduceSum": "axes must be an initializer", "ReduceSumSquare": "axes must be an initializer",
    "Relu": "", "Reshape": "",
    "Resize": (
        "coordinate modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, align_corners; "
        "modes nearest and linear (no cubic); aspect-ratio policy stretch; no antialiasing"
    ),
    "ReverseSequence": "",
    "RNN": "bidirectional RNNs need the same activations in both directions",
    "RoiAlign": "", "Round": "",
    "STFT": "real-valued input only",  # added in 10.5
    "ScaledTanh": "", "Scan": "", "Scatter": "", "ScatterElements": "",
    "ScatterND": "reduction is not supported",
    "Selu": "", "Shape": "", "Shrink": "", "Sigmoid": "", "Sign": "", "Sin": "", "Sinh": "", "Size": "",
    "Slice": "",  # tensor axes input supported since 10.3
    "Softmax": "", "Softplus": "", "Softsign": "", "SpaceToDepth": "", "Split": "", "Sqrt": "",
    "Squeeze": "axes must be an initializer",
    "Sub": "", "Sum": "", "Tan": "", "Tanh": "", "ThresholdedRelu": "", "Tile": "",
    "TopK": "sorted must be 1; K must be below 3840",
    "Transpose": "", "Trilu": "",
    "Unsqueeze": "axes must be a constant tensor",
    "Upsample": "", "Where": "", "Xor": "",
}

SUPPORTED_OPS: frozenset[str] = frozenset(RESTRICTIONS)

# Listed as "N" in the parser's table; kept to make "not supported" explicit rather than merely "not listed".
KNOWN_UNSUPPORTED_OPS: frozenset[str] = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})


def _op_key(node: onnx.NodeProto) -> str:
    """Op type for default-domain nodes, ``domain::OpType`` otherwise (a custom domain is never a built-in)."""
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def _walk_nodes(graph: onnx.GraphProto, functions: dict[tuple[str, str], onnx.FunctionProto], seen: set):
    """Yield every node of `graph`, of its subgraphs (If/Loop/Scan bodies) and of model-local functions it calls.

    Nodes that call a model-local function are replaced by the function body: the parser inlines local functions
    (since TensorRT 9.0), so the body's ops are what must be supported.
    """
    for node in graph.node:
        called = functions.get((node.domain, node.op_type))
        if called is not None:
            if (node.domain, node.op_type) not in seen:  # guard against (invalid) recursive functions
                yield from _walk_function(called, functions, seen | {(node.domain, node.op_type)})
            continue
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attribute.g, functions, seen)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _walk_nodes(subgraph, functions, seen)


def _walk_function(function: onnx.FunctionProto, functions, seen: set):
    body = onnx.GraphProto(node=function.node)
    yield from _walk_nodes(body, functions, seen)


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    """How often each op type occurs, subgraphs and local functions included (keys as in `unsupported_ops`)."""
    functions = {(function.domain, function.name): function for function in model.functions}
    return Counter(_op_key(node) for node in _walk_nodes(model.graph, functions, set()))


def unsupported_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op types TensorRT 10.5's ONNX parser cannot import -> occurrence count; empty when all are supported.

    Ops in a non-default domain are reported as ``domain::OpType``: TensorRT imports those only through a
    registered plugin, which this project does not ship.
    """
    return {op: count for op, count in sorted(op_counts(model).items()) if op not in SUPPORTED_OPS}


def restricted_ops(model: onnx.ModelProto) -> dict[str, str]:
    """Supported ops used by `model` whose import carries a documented restriction -> that restriction."""
    return {op: RESTRICTIONS[op] for op in sorted(op_counts(model)) if RESTRICTIONS.get(op)}


def opset_problem(model: onnx.ModelProto) -> str | None:
    """A sentence when the default-domain opset lies outside what the parser documents, else None."""
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            if entry.version < MIN_OPSET:
                return f"opset {entry.version} is below TensorRT's minimum ({MIN_OPSET}); re-export with a newer opset"
            if entry.version > MAX_OPSET:
                return (f"opset {entry.version} is above the highest opset TensorRT {TENSORRT_VERSION} documents "
                        f"({MAX_OPSET}); export with opset <= {MAX_OPSET} to be safe")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check an ONNX graph's operators against TensorRT's ONNX parser.")
    parser.add_argument("onnx", type=Path, help="ONNX file to check")
    args = parser.parse_args(argv)
    # Weights are irrelevant to the op check; skip loading external data.
    model = onnx.load(str(args.onnx), load_external_data=False)
    counts = op_counts(model)
    missing = unsupported_ops(model)
    problem = opset_problem(model)
    if problem:
        print(f"[trt-ops] warning: {problem}")
    for op, note in restricted_ops(model).items():
        print(f"[trt-ops] note: {op}: {note}")
    if missing:
        listed = ", ".join(f"{op} x{count}" for op, count in missing.items())
        print(f"[trt-ops] {args.onnx}: unsupported by TensorRT {TENSORRT_VERSION}'s ONNX parser: {listed}",
              file=sys.stderr)
        return 1
    print(f"[trt-ops] {args.onnx}: all {len(counts)} op types ({sum(counts.values())} nodes) are supported by "
          f"TensorRT {TENSORRT_VERSION}'s ONNX parser")
    return 0


if __name__ == "__main__":
    sys.exit(main())
