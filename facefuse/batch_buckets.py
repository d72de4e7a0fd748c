"""Batch sizes rounded up to powers of two on CUDA, so that the GPU sees a few shapes, all warmed up at load.

Each new input shape costs PyTorch/cuDNN a one-off (kernel selection and set-up): on the H200 the face mesh paid
~1.9 s the first time it saw each batch size, MTCNN ~0.1 s. With dynamic batching and per-batch candidate counts a
server would meet new sizes for hours, each a latency stall; padded to buckets it meets each bucket once, at load.
Padding rows are zeros (the nets treat rows independently) and their outputs are dropped. The CPU is not padded:
there the padding would be real work, and per-shape set-up is cheap.
"""

from __future__ import annotations

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
