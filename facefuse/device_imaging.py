"""Images as tensors on the detector's device: batched decoding (nvJPEG on CUDA) and the aligned-crop warp.

The GPU path of preprocess: JPEGs are decoded on the GPU in one batched call, so a 1080p photo never exists as a host
array in preprocess: torchvision's nvJPEG binding (the GPU's hardware JPEG engines where it has them, then two waits
for the GPU per batch), or, with FACEFUSE_JPEG_DECODER=nvimgcodec, nvImageCodec's decoder (the same engines, queued on
torch's stream without a wait). Served they give the same images/s (0.99x at c=64 on an H100 in two alternating
rounds, bench/RESULTS.md session 26): the detector's first wait takes up what the decode's waits gave back, so
nvImageCodec stays opt-in. auto (the default) takes torchvision where it is installed, else nvImageCodec where that
is. Every limit is still checked from the header with Pillow first (facefuse.imaging), EXIF orientation is applied on
the device, and anything the GPU decoders cannot take (PNG, WebP, BMP, CMYK JPEGs, truncated or corrupt data) goes
through ``decode_image`` so that errors and results are the host path's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from facefuse.alignment import CROP_SIZE, invert_affine
from facefuse.errors import FusionError
from facefuse.imaging import ImageLimits, _check_limits, _open_header, _orientation, decode_image

JPEG_DECODER_VARIABLE = "FACEFUSE_JPEG_DECODER"
JPEG_DECODERS = ("auto", "nvimgcodec", "torchvision")  # auto: torchvision where importable, else nvimgcodec

# A batched GPU decoder: JPEG files -> (3,H,W) uint8 tensors on the device (None where it cannot decode one).
GpuJpegDecoder = Callable[[list[bytes], torch.device], list[torch.Tensor | None]]


@functools.lru_cache(maxsize=1)
def nvjpeg_decoder() -> Callable | None:
    """torchvision.io.decode_jpeg, or None where torchvision is not importable (it is not installed beside the CPU
    torch of the local environment; GPU hosts have it)."""
    try:
        from torchvision.io import decode_jpeg
    except Exception:  # noqa: BLE001 - any import failure means: no GPU decoding
        return None
    return decode_jpeg


def _torchvision_decode(jpegs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    try:
        return list(nvjpeg_decoder()(encoded, mode=ImageReadMode.RGB, device=device))  # one batched nvJPEG call
    except RuntimeError:
        return [None] * len(jpegs)  # one bad file fails the batch: the host path sorts them out


class NvImageCodecDecoder:
    """nvImageCodec's batched JPEG decoder on one GPU: its hardware JPEG engines (NVJPG) first, nvJPEG's CUDA decoder
    for what they cannot take. Unlike torchvision's binding it queues the decode on torch's stream instead of waiting
    for it (twice) per batch, so the host can queue the detector's work meanwhile; a file it cannot decode comes back
    None alone (the host path then gives its error), not the whole batch. Planar RGB out, as torchvision's decoder
    gives, so the later steps see the same layout."""

    def __init__(self, device: torch.device) -> None:
        """``device``: a CUDA device with its index."""
        from nvidia import nvimgcodec

        self._codec = nvimgcodec
        # One host thread: the engines do the work; a pool per instance (the default: one thread per core) would
        # put 16 idle threads into each of six preprocess processes.
        self._decoder = nvimgcodec.Decoder(device_id=device.index, max_num_cpu_threads=1,
                                           backends=[nvimgcodec.Backend(nvimgcodec.HW_GPU_ONLY),
                                                     nvimgcodec.Backend(nvimgcodec.GPU_ONLY)])
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False,  # orient() does it, as for torchvision
                                               color_spec=nvimgcodec.ColorSpec.SRGB,
                                               sample_format=nvimgcodec.SampleFormat.P_RGB)

    def __call__(self, jpegs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
        results: list[torch.Tensor | None] = [None] * len(jpegs)
        streams, positions = [], []
        for position, data in enumerate(jpegs):
            try:  # the stream's markers are read here: a truncated or corrupt file raises
                streams.append(self._codec.CodeStream(data))
                positions.append(position)
            except RuntimeError:
                continue  # None: the host path gives its error
        if not streams:
            return results
        try:
            # Decoded in the order of torch's current stream, so the kernels that read the pixels next wait for them.
            images = self._decoder.decode(streams, params=self._params,
                                          cuda_stream=torch.cuda.current_stream(device).cuda_stream)
        except RuntimeError:
            return results  # the host path sorts them out
        for position, image in zip(positions, images, strict=True):
            results[position] = None if image is None else torch.from_dlpack(image)
        return results


def gpu_jpeg_decoder(device: torch.device | str, choice: str | None = None) -> GpuJpegDecoder | None:
    """The batched JPEG decoder for ``device`` (``choice``: one of JPEG_DECODERS, default $FACEFUSE_JPEG_DECODER,
    else auto), or None where there is none (a CPU device; no nvImageCodec and no torchvision). One per GPU and
    process: "cuda" and "cuda:0" get the same one."""
    choice = (choice if choice is not None else os.environ.get(JPEG_DECODER_VARIABLE, "auto")).strip().lower()
    if choice not in JPEG_DECODERS:
        raise ValueError(f"{JPEG_DECODER_VARIABLE}={choice!r}: expected one of {', '.join(JPEG_DECODERS)}")
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _gpu_jpeg_decoder(device.index if device.index is not None else torch.cuda.current_device(), choice)


@functools.lru_cache(maxsize=8)
def _gpu_jpeg_decoder(index: int, choice: str) -> GpuJpegDecoder | None:
    torchvision = _torchvision_decode if nvjpeg_decoder() is not None else None
    if choice == "torchvision" or (choice == "auto" and torchvision is not None):
        return torchvision
    try:
        return NvImageCodecDecoder(torch.device("cuda", index))
    except (ImportError, RuntimeError) as error:  # not installed, or its libraries do not load here
        if choice == "nvimgcodec":
            raise RuntimeError(f"{JPEG_DECODER_VARIABLE}=nvimgcodec but nvImageCodec is not usable here "
                               f"({type(error).__name__}: {error}); install nvidia-nvimgcodec-cu12[nvjpeg] "
                               "(CUDA 12) or nvidia-nvimgcodec-cu13[nvjpeg] (CUDA 13)") from error
        return None


def describe_jpeg_decoding(device: torch.device | str) -> str:
    """Which decoder preprocess's JPEGs go through on ``device``, for the model's start-up log."""
    decoder = gpu_jpeg_decoder(device)
    if isinstance(decoder, NvImageCodecDecoder):
        return "nvImageCodec on the GPU (hardware JPEG engines, else nvJPEG CUDA)"
    return "torchvision nvJPEG on the GPU" if decoder is not None else "Pillow on the host"


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Bring an HxWx3 tensor upright for an EXIF orientation 1-8 (the transposes Pillow's exif_transpose applies)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(0, 1)
    flips = {2: (1,), 3: (0, 1), 4: (0,), 5: (), 6: (1,), 7: (0, 1), 8: (0,)}.get(orientation, ())
    return image.flip(flips) if flips else image


_END_OF_IMAGE = b"\xff\xd9"  # JPEG's EOI marker


def _jpeg_header(data: bytes, role: str, limits: ImageLimits) -> int | None:
    """EXIF orientation of a whole RGB/grey JPEG for the GPU decoders (after the limit checks), None for anything
    else (other formats, CMYK, truncated files: the host path decodes them or gives their error)."""
    if len(data) > limits.max_bytes:
        return None  # decode_image raises the IMAGE_TOO_LARGE error with its message
    im, fmt = _open_header(data, role, limits)
    try:
        _check_limits(*im.size, limits, role)
        if fmt != "JPEG" or im.mode not in ("RGB", "L"):  # CMYK / YCCK JPEGs: Pillow converts them properly
            return None
        # A truncated file has no end-of-image marker after its first scan (Pillow stops reading there; scan data
        # cannot hold the marker's bytes). It goes to the host path, whose error says "truncated": nvJPEG's
        # hardware engines need not reject it, and a half-grey photo is not what the client sent.
        if data.rfind(_END_OF_IMAGE, im.fp.tell()) < 0:
            return None
        return _orientation(im)
    finally:
        im.close()


def decode_on_device(items: Sequence[tuple[bytes, str]], limits: ImageLimits,
                     device: torch.device) -> list[torch.Tensor | FusionError]:
    """Decode (bytes, role) pairs to upright HxWx3 uint8 tensors on ``device``; a failure is that item's
    FusionError (the same code and message as ``decode_image``)."""
    results: list[torch.Tensor | FusionError | None] = [None] * len(items)
    decoder = gpu_jpeg_decoder(device)
    on_gpu: list[tuple[int, int]] = []  # (item, orientation)
    for position, (data, role) in enumerate(items):
        try:
            orientation = _jpeg_header(data, role, limits) if decoder is not None else None
        except FusionError as error:
            results[position] = error
            continue
        if orientation is not None:
            on_gpu.append((position, orientation))
    if on_gpu:
        decoded = decoder([items[position][0] for position, _ in on_gpu], device)
        for (position, orientation), chw in zip(on_gpu, decoded, strict=True):
            if chw is not None:
                results[position] = orient(chw.permute(1, 2, 0), orientation)
    for position, (data, role) in enumerate(items):
        if results[position] is None:
            try:
                results[position] = torch.from_numpy(decode_image(data, limits, role=role)).to(device)
            except FusionError as error:
                results[position] = error
    return results  # type: ignore[return-value]


def to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Device tensors as host arrays, copied together (one page-locked buffer per dtype) with one wait: pageable
    device-to-host copies ran at ~1.3 GB/s on the H200 host, 6 MB per 1080p image. The arrays are views that keep
    their buffer alive, so torch's pinned-memory cache reuses it only once they are gone."""
    pinned = torch.cuda.is_available() and any(tensor.is_cuda for tensor in tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for position, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(position)
    arrays: list[np.ndarray | None] = [None] * len(tensors)
    for dtype, positions in by_dtype.items():
        host = torch.empty(sum(tensors[p].numel() for p in positions), dtype=dtype, pin_memory=pinned)
        start = 0
        for p in positions:
            host[start:start + tensors[p].numel()].copy_(tensors[p].reshape(-1), non_blocking=pinned)
            start += tensors[p].numel()
        flat, start = host.numpy(), 0
        for p in positions:
            arrays[p] = flat[start:start + tensors[p].numel()].reshape(tuple(tensors[p].shape))
            start += tensors[p].numel()
    if pinned:
        torch.cuda.synchronize()  # the views are read only after every copy has landed
    return arrays  # type: ignore[return-value]


_UPLOAD_ALIGNMENT = 16  # bytes: every dtype's view of the shared buffer starts aligned


def to_device(arrays: Sequence[np.ndarray], device: torch.device | str) -> list[torch.Tensor]:
    """Small host arrays (any dtypes and shapes) as tensors on ``device`` through one copy: a copy from pageable
    memory makes the host wait for the GPU's queue, so three tables uploaded apart cost three waits, together one.
    The tensors are views of one device buffer; numpy's dtypes map to torch's (int64 -> int64, float64 -> float64).
    Page-locked staging without the wait halves the waits but has not shown a clear gain: one buffer per tensor was
    slower (H100, session 9); one per call measured 6.77 vs 5.47 ms per postprocess row on one H100 and 6.40 vs 8.79
    on another (session 12, bench/RESULTS.md): within the noise of in-process timings, so not adopted."""
    shapes = [np.shape(array) for array in arrays]
    arrays = [np.ascontiguousarray(array) for array in arrays]
    offsets, total = [], 0
    for array in arrays:
        offsets.append(total)
        total += -(-array.nbytes // _UPLOAD_ALIGNMENT) * _UPLOAD_ALIGNMENT
    packed = np.zeros(max(total, 1), dtype=np.uint8)
    for array, offset in zip(arrays, offsets, strict=True):
        packed[offset:offset + array.nbytes] = array.reshape(-1).view(np.uint8)
    uploaded = torch.from_numpy(packed).to(device)
    return [uploaded[offset:offset + array.nbytes].view(torch.from_numpy(np.empty(0, array.dtype)).dtype)
            .reshape(shape) for array, offset, shape in zip(arrays, offsets, shapes, strict=True)]


def host_array(value: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy array as it is, or a tensor (any device) copied to the host as one."""
    return value if isinstance(value, np.ndarray) else value.contiguous().cpu().numpy()


def stack_rows(rows: list[np.ndarray | torch.Tensor]) -> np.ndarray | torch.Tensor:
    """Equal-shape rows (host arrays, or tensors of one device) stacked into one batch of their kind; one row is
    returned as a view of it (no copy, and on a GPU no kernel: most responses carry one row)."""
    if len(rows) == 1:
        return rows[0][None]
    return np.stack(rows) if isinstance(rows[0], np.ndarray) else torch.stack(rows)


def concat_rows(batches: list[np.ndarray | torch.Tensor],
                device: torch.device | None) -> np.ndarray | torch.Tensor:
    """Batches (host arrays or tensors, mixed) concatenated: as one tensor on ``device`` (host arrays uploaded), or
    with ``device`` None as one host array (tensors brought down)."""
    if device is None:
        return np.concatenate([host_array(batch) for batch in batches])
    return torch.cat([torch.as_tensor(batch).to(device) for batch in batches])


# cv2.warpAffine: source positions in 10-bit fixed point (AB_BITS), rounded to 1/32 px (INTER_BITS) for the
# bilinear weight tables.
_AB_BITS = 10
_INTER_BITS = 5


def cv2_inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse cv2.warpAffine computes from a forward matrix, with its operations in its order (float64)."""
    m = np.asarray(matrix, dtype=np.float64).ravel().tolist()
    det = m[0] * m[4] - m[1] * m[3]
    det = 1.0 / det if det != 0 else 0.0
    a11, a22 = m[4] * det, m[0] * det
    m[0], m[1], m[3], m[4] = a11, m[1] * -det, m[3] * -det, a22
    b1 = -m[0] * m[2] - m[1] * m[5]
    b2 = -m[3] * m[2] - m[4] * m[5]
    m[2], m[5] = b1, b2
    return np.array(m, dtype=np.float64).reshape(2, 3)


def cv2_warp_grid(inverse: np.ndarray, width: int, height: int, size: int, device: torch.device) -> torch.Tensor:
    """grid_sample grid (1, height, width, 2) sampling a size x size source where cv2.warpAffine does with the
    output -> source matrix ``inverse`` (``cv2_inverse`` of a forward matrix, or the matrix given with
    WARP_INVERSE_MAP): ``cv2_warp_tables`` uploaded (one wait for the GPU), then ``cv2_grid_of_tables``.
    """
    columns, rows = to_device(list(cv2_warp_tables(inverse, width, height)), device)
    return cv2_grid_of_tables(columns, rows, size)


def cv2_warp_tables(inverse: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-column and per-row terms of cv2.warpAffine's fixed-point source positions for a width x height
    output and the output -> source matrix ``inverse``: (2, width) and (2, height) int64 host arrays (x terms, then
    y terms). Several warps' tables can go up in one copy.

    cv2 maps each output pixel through the inverse matrix in fixed point, X = (round((m1*y + m2) * 2^10) + 16
    + round(m0*x * 2^10)) >> 5, i.e. the source position to the nearest 1/32 px, and interpolates bilinearly
    there; pixel centres are at integer positions. Only the per-row and per-column terms are computed here; the
    per-pixel sum is on the device (``cv2_grid_of_tables``).
    """
    m = np.asarray(inverse, dtype=np.float64)
    scale = float(1 << _AB_BITS)
    round_delta = 1 << (_AB_BITS - _INTER_BITS - 1)
    xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    columns = np.stack([np.rint(m[0, 0] * xs * scale), np.rint(m[1, 0] * xs * scale)]).astype(np.int64)
    rows = np.stack([np.rint((m[0, 1] * ys + m[0, 2]) * scale), np.rint((m[1, 1] * ys + m[1, 2]) * scale)])
    return columns, rows.astype(np.int64) + round_delta


def cv2_grid_of_tables(columns: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    """The (1, height, width, 2) grid_sample grid of ``cv2_warp_tables`` (on the device) over a size x size source.
    With align_corners=False grid_sample's pixel u is at (2u + 1) / size - 1; u = X / 32 makes that
    (X + 16) / (16 * size) - 1, exact in float32 for a power-of-two size."""
    shift = _AB_BITS - _INTER_BITS
    half = 1 << (_INTER_BITS - 1)
    denominator = float(size << (_INTER_BITS - 1))
    gx = ((rows[0, :, None] + columns[0, None, :]) >> shift) + half
    gy = ((rows[1, :, None] + columns[1, None, :]) >> shift) + half
    grid = torch.stack([gx.to(torch.float32) / denominator - 1.0, gy.to(torch.float32) / denominator - 1.0], dim=-1)
    return grid[None]


def crops_to_network(crops: torch.Tensor) -> torch.Tensor:
    """``alignment.crop_to_tensor`` for a batch on its device: (N,S,S,3) uint8 -> (N,3,S,S) float32 in [0, 1],
    bit-identical (the same correctly rounded float32 division)."""
    return crops.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def image_to_device(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host HxWx3 uint8 array (read-only is fine) on ``device``; CUDA uploads go through page-locked memory (a
    pageable 6 MB upload is several times slower)."""
    if device.type != "cuda":
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(device)
    staging = torch.empty(image.shape, dtype=torch.uint8, pin_memory=True)
    staging.numpy()[...] = image
    return staging.to(device, non_blocking=True)


def _flat_layout(image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """An HxWx3 image's values as a flat tensor and the (row, column, channel) strides of its pixels there: a view
    of nvJPEG's (3,H,W) planes under their HxWx3 view (no copy of the photo), else the packed HxWx3 values."""
    height, width = image.shape[:2]
    planes = image.permute(2, 0, 1)
    if planes.is_contiguous():
        return planes.reshape(-1), (width, 1, height * width)
    return image.reshape(-1), (3 * width, 3, 1)


def warp_to_crops(image: torch.Tensor, matrices: np.ndarray, crop_size: int = CROP_SIZE) -> torch.Tensor:
    """``alignment.warp_to_crop`` for several faces of one HxWx3 uint8 tensor: (N,2,3) image->crop matrices ->
    (N,S,S,3) uint8 crops on the image's device (bilinear, mirrored border; matches OpenCV to ~1 grey level)."""
    return warp_crops_of_images([image], np.zeros(len(matrices), dtype=np.int64), matrices, crop_size)


def warp_crops_of_images(images: list[torch.Tensor], image_index: np.ndarray, matrices: np.ndarray,
                         crop_size: int = CROP_SIZE) -> torch.Tensor:
    """Crops of many images at once: crop n is ``matrices[n]`` (image -> crop) applied to
    ``images[image_index[n]]`` (HxWx3 uint8 tensors of any sizes, on one device) -> (N,S,S,3) uint8.

    One gather over the images' bytes does every crop: no per-image launches, and only the sampled pixels are made
    float (a whole 1080p image in float is 25 MB)."""
    device = images[0].device
    image_index = np.asarray(image_index, dtype=np.int64)
    count = len(image_index)
    layouts = [_flat_layout(image) for image in images]
    flat = layouts[0][0] if len(layouts) == 1 else torch.cat([values for values, _ in layouts])
    starts = np.cumsum([0] + [image.numel() for image in images[:-1]])
    heights = np.array([image.shape[0] for image in images])
    widths = np.array([image.shape[1] for image in images])
    strides = np.array([layout for _, layout in layouts], dtype=np.int64)[image_index]  # (N, 3): row, column, channel
    # The per-crop tables in one upload (one wait for the GPU): inverse matrices, last pixel centres (x, y), where
    # each image starts in ``flat`` and its strides there.
    inverse, last, base, strides = to_device([
        np.stack([invert_affine(matrix) for matrix in matrices]).astype(np.float64),
        np.stack([np.maximum(widths - 1, 1), np.maximum(heights - 1, 1)], axis=1)[image_index].astype(np.float64),
        starts[image_index].astype(np.int64), strides], device)
    last, base = last[:, None, :], base[:, None]  # (N, 1, 2), (N, 1)
    # (N, 1, 1) for the (N, P, 2) neighbour positions; the channel's (N, 1, 1, 1, 1) for the (N, P, 2, 2, 3) taps.
    row_stride, column_stride, channel_stride = strides[:, 0, None, None], strides[:, 1, None, None], strides[:, 2]
    channel_stride = channel_stride[:, None, None, None, None]
    centres = torch.arange(crop_size, device=device, dtype=torch.float64)
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(-1, 3)  # crop pixels (x, y, 1)
    source = points @ inverse.transpose(1, 2)  # (N, S*S, 2) image pixel coordinates
    # OpenCV's BORDER_REFLECT101 mirrors about the first and last pixel centres; for bilinear sampling that equals
    # folding the coordinate into [0, size - 1] (period 2 * (size - 1)) and sampling there.
    folded = (last - (torch.remainder(source, 2.0 * last) - last).abs()).float()
    low = folded.floor()
    weight = folded - low  # (N, S*S, 2): the upper neighbour's weight along x and y
    low = low.long()
    high = torch.minimum(low + 1, last.long())  # at the last pixel centre the weight of the next one is 0
    # The 2 x 2 taps of every crop pixel in one gather and one weighted sum (a loop over the taps launched ~40
    # small kernels; on the GPU the host's launches, not the arithmetic, bound this step).
    neighbours = torch.stack([low, high], -1)  # (N, P, axis x/y, lower/upper)
    weights = torch.stack([1.0 - weight, weight], -1)
    xs, ys, wx, wy = neighbours[..., 0, :], neighbours[..., 1, :], weights[..., 0, :], weights[..., 1, :]
    pixel = (base[..., None] + ys * row_stride)[..., :, None] + (xs * column_stride)[..., None, :]  # (N, P, 2, 2)
    taps = flat[pixel[..., None] + torch.arange(3, device=device) * channel_stride].float()  # (N, P, 2, 2, 3)
    crops = (taps * (wy[..., :, None] * wx[..., None, :])[..., None]).sum(dim=(2, 3))
    return crops.round_().clamp_(0, 255).to(torch.uint8).reshape(count, crop_size, crop_size, 3)


__all__ = ["JPEG_DECODERS", "JPEG_DECODER_VARIABLE", "NvImageCodecDecoder", "crops_to_network", "cv2_grid_of_tables",
           "cv2_inverse", "cv2_warp_grid", "cv2_warp_tables", "decode_on_device", "describe_jpeg_decoding",
           "gpu_jpeg_decoder", "host_array", "image_to_device", "nvjpeg_decoder", "orient", "to_device", "to_host",
           "warp_crops_of_images", "warp_to_crops"]
