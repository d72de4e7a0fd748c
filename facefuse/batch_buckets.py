"""Batch sizes rounded up to powers of two on CUDA, so that the GPU sees a few shapes, all warmed up at load.

Each new input shape costs PyTorch/cuDNN a one-off (kernel selection and set-up): on the H200 the face mesh paid
~1.9 s the first time it saw each batch size, MTCNN ~0.1 s. With dynamic batching and per-batch candidate counts a
server would meet new sizes for hours, each a latency stall; padded to buckets it meets each bucket once, at load.
Padding rows are zeros (the nets treat rows independently) and their outputs are dropped. The CPU is not padded:
there the padding would be real work, and per-shape set-up is cheap.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a tensor is padded: the fusion runtime may run without it
    import torch


def bucket_size(count: int) -> int:
    """The smallest power of two >= ``count`` (1 for 0 or 1)."""
    return 1 << max(0, int(count) - 1).bit_length()


def bucket_sizes(largest: int) -> tuple[int, ...]:
    """Every bucket a batch of up to ``largest`` rows can fall into: 1, 2, 4, ... bucket_size(largest)."""
    return tuple(1 << power for power in range(bucket_size(largest).bit_length()))


def forward_in_bucket(net: Callable[[torch.Tensor], Any], batch: torch.Tensor, pad: bool | None = None) -> Any:
    """``net(batch)`` with the batch padded to its bucket (``pad`` None: when it is on CUDA); every output (a
    tensor or a tuple of them, batch first) cut back to the real rows."""
    count = len(batch)
    padded = bucket_size(count)
    if pad is None:
        pad = batch.device.type == "cuda"
    if not pad or count == 0 or padded == count:
        return net(batch)
    import torch

    outputs = net(torch.cat([batch, batch.new_zeros((padded - count, *batch.shape[1:]))]))
    if isinstance(outputs, torch.Tensor):
        return outputs[:count]
    return type(outputs)(output[:count] for output in outputs)


class BucketedNet:
    """``net`` with its batches padded to buckets (``pad``, as ``forward_in_bucket``) and, with ``cuda_graphs``,
    each bucket of up to ``max_graph_rows`` rows replayed from a CUDA graph captured on its first batch (warm-up).

    The detector's and mesh's nets are a hundred-odd small kernels each; launching them one by one costs more host
    time than the GPU spends on them at small batches, and the Python models are host-bound. A graph replay is one
    launch. The graphs of one net share one memory pool (they never run at once); outputs are copied out of the
    graph's buffers, so that a later replay cannot overwrite what a caller still holds."""

    def __init__(self, net: Callable[[torch.Tensor], Any], pad: bool, cuda_graphs: bool = True,
                 max_graph_rows: int = 1024, compile_net: bool = False, name: str = "net") -> None:
        self.net = net
        self.pad = pad
        self.cuda_graphs = bool(cuda_graphs and pad)
        self.max_graph_rows = int(max_graph_rows)
        self.name = name
        # What the graphs capture: with ``compile_net`` (CUDA graphs only) the net through torch.compile, whose
        # Inductor kernels fuse the element-wise steps between convolutions (BlazeFace's residual adds, ReLUs and
        # channel pads: H100, 16 photos, 1.60 -> 0.84 ms per pass). torch.compile's automatic dynamic shapes: the
        # first bucket compiles for its size, the second recompiles with the batch dimension symbolic, and that
        # serves every later bucket (the other dimensions never change).
        self.graph_net = net
        if compile_net and self.cuda_graphs:
            import torch

            self.graph_net = torch.compile(net)
        self.graphs: dict[tuple, tuple[Any, torch.Tensor, Any]] = {}
        self._pool = None

    def __call__(self, batch: torch.Tensor) -> Any:
        count = len(batch)
        bucket = bucket_size(count)
        if not self.pad or not self.cuda_graphs or count == 0 or bucket > self.max_graph_rows \
                or batch.device.type != "cuda":
            return forward_in_bucket(self.net, batch, self.pad)
        graph, static_input, static_outputs = self._graph(bucket, batch)
        static_input[:count].copy_(batch)
        if count < bucket:
            static_input[count:].zero_()
        graph.replay()
        if isinstance(static_outputs, tuple):
            return tuple(output[:count].clone() for output in static_outputs)
        return static_outputs[:count].clone()

    def _graph(self, bucket: int, batch: torch.Tensor) -> tuple[Any, torch.Tensor, Any]:
        import torch

        key = (bucket, tuple(batch.shape[1:]), batch.dtype, batch.device)
        if key not in self.graphs:
            static_input = batch.new_zeros((bucket, *batch.shape[1:]))
            stream = torch.cuda.Stream(batch.device)
            stream.wait_stream(torch.cuda.current_stream(batch.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiling, cuDNN's algorithm choice and lazy set-up happen outside the capture
                    self.warm(static_input)
            torch.cuda.current_stream(batch.device).wait_stream(stream)
            graph, static_outputs = self.capture_or_eager(static_input)
            self._pool = graph.pool()
            self.graphs[key] = (graph, static_input, static_outputs)
        return self.graphs[key]

    def capture(self, static_input: torch.Tensor) -> tuple[Any, Any]:
        """A CUDA graph of one pass of ``graph_net`` over ``static_input`` (this net's memory pool) and its
        outputs."""
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_outputs = self.graph_net(static_input)
        return graph, static_outputs

    def capture_or_eager(self, static_input: torch.Tensor) -> tuple[Any, Any]:
        """``capture``; where the compiled net's capture fails, the eager net's (``warm`` says why)."""
        try:
            return self.capture(static_input)
        except Exception as error:  # noqa: BLE001 - compiled code a capture refuses: the eager net instead
            if self.graph_net is self.net:
                raise
            self._without_compile(error, "capture")
            return self.capture(static_input)

    def warm(self, batch: torch.Tensor) -> Any:
        """One pass of what the graphs capture, outside a capture. Where torch.compile fails here or in the
        capture (no working compiler for its kernels, an operator it cannot trace, code a capture refuses) the
        graphs take the eager net instead, and stderr says so once: a slower net, never a failed model load."""
        try:
            return self.graph_net(batch)
        except Exception as error:  # noqa: BLE001 - Inductor/Triton raise many kinds; the eager net is the answer
            if self.graph_net is self.net:
                raise
            self._without_compile(error, "first pass")
            return self.net(batch)

    def _without_compile(self, error: Exception, step: str) -> None:
        detail = str(error).splitlines()[0][:200] if str(error) else ""
        print(f"[facefuse] torch.compile of the {self.name} failed in its {step} ({type(error).__name__}: {detail}); "
              "its CUDA graphs run the eager net", file=sys.stderr, flush=True)
        self.graph_net = self.net
