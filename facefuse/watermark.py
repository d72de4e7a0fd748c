"""Blind invisible watermark: a 64-bit id in the luma of 8x8 block-DCT coefficients (dithered QIM).

Design (all of it keyed by ``_KEY``; embedder and extractor must agree on every constant below):

* Luma only, and changed *identically* in R, G and B: the JPEG/WebP chroma planes (Cb, Cr) are untouched, so
  chroma subsampling cannot hurt the mark.
* 8x8 blocks aligned to the image origin, i.e. to the JPEG block grid, so that a JPEG re-encode quantises exactly
  the coefficients that carry the mark. The ragged right/bottom border (< 8 px) is left untouched.
* In each block, ``len(_COEFFS)`` low/mid-frequency DCT coefficients carry one codeword bit each by dithered
  quantisation index modulation: the coefficient is moved onto the lattice ``step*(k + dither + bit/2)``. QIM
  rejects host interference (unlike spread spectrum), so even a 64x64 image carries the payload.
* Codeword = 64-bit id + CRC-16, whitened with a keyed mask: 80 bits. A keyed permutation spreads each bit over
  ~1/80 of all coefficient slots across the whole image; extraction soft-votes ``cos(2*pi*phase)`` per slot.
* ``present`` needs the CRC to check *and* a vote strength far above what an unmarked image gives (unmarked
  slots have a uniformly random phase because of the dither), so photos, noise and flat images read as absent.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from dataclasses import dataclass

import cv2
import numpy as np

PAYLOAD_BITS = 64
CRC_BITS = 16
CODE_BITS = PAYLOAD_BITS + CRC_BITS

# (row, column) = (vertical, horizontal) frequency of the carrier coefficients. Low/mid frequencies: small JPEG
# quantisation steps (q50 table 10..14), so they survive JPEG q75 with margin; no DC (visible block flicker).
_COEFFS = ((0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (1, 2), (2, 1))
# QIM lattice step in orthonormal-DCT units. Error-free decoding needs coefficient noise < STEP/4 (=5 here);
# the mean squared change per carrier is (STEP*strength)^2/12, giving ~42 dB PSNR at strength 1.
_STEP = 20.0
_KEY = b"facefuse-watermark-v1"
# Detection threshold on the mean |z| of the per-bit vote sums: on unmarked images z ~ N(0,1) per bit, so mean |z|
# is 0.80 +- 0.07 (measured max 0.99 over 600 photos/noise/flat/gradient/JPEG images); 1.4 is ~9 sigma above.
# Marked images score 3 (64x64) to 75 (1080p), and still >= 2.7 after JPEG q75 at 64x64.
_Z_THRESHOLD = 1.4
# Soft-decision (Chase) decoding: if the hard decision fails the CRC, also try flipping subsets of this many least
# reliable bits. 2**3 candidates cost 3 bits of the CRC's 16 against false accepts, behind the z gate above.
_CHASE_BITS = 3
_MIN_REPEATS = 2  # fewer slots per bit than this: too small to carry the mark


@dataclass(frozen=True)
class WatermarkReading:
    present: bool
    watermark_id: str | None  # 16 lowercase hex digits when present
    confidence: float  # mean |vote| per codeword bit, 0..1 (1 = every slot agrees; ~0 on unmarked images)


def parse_watermark_id(text: str) -> int:
    """'0x1A2b' / '1a2b' / up to 16 hex digits -> int; ValueError on anything else."""
    if not isinstance(text, str):
        raise ValueError("watermark id must be a string of hex digits")  # noqa: TRY004 - one error type for callers
    digits = text.strip()
    if digits[:2].lower() == "0x":
        digits = digits[2:]
    if not 1 <= len(digits) <= 16 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise ValueError(f"watermark id must be 1 to 16 hex digits (optional 0x), got {text!r}")
    return int(digits, 16)


def format_watermark_id(value: int) -> str:
    return f"{value:016x}"


def _crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def _rng(label: bytes) -> np.random.Generator:
    seed = int.from_bytes(hashlib.sha256(_KEY + b"/" + label).digest()[:16], "big")
    return np.random.Generator(np.random.PCG64(seed))


_WHITENING = _rng(b"whitening").integers(0, 2, CODE_BITS, dtype=np.uint8)


def _encode_bits(watermark_id: int) -> np.ndarray:
    payload = watermark_id.to_bytes(8, "big")
    crc = _crc16(payload)
    bits = np.unpackbits(np.frombuffer(payload + crc.to_bytes(2, "big"), dtype=np.uint8))
    return bits ^ _WHITENING  # whitening: id 0 must not become a constant pattern


def _decode_bits(bits: np.ndarray) -> int | None:
    raw = np.packbits(bits.astype(np.uint8) ^ _WHITENING).tobytes()
    payload, crc = raw[:8], int.from_bytes(raw[8:10], "big")
    return int.from_bytes(payload, "big") if _crc16(payload) == crc else None


def _dct_matrix() -> np.ndarray:
    n = np.arange(8)
    matrix = np.sqrt(2 / 8) * np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 16)
    matrix[0] /= np.sqrt(2)
    return matrix  # orthonormal DCT-II: coefficients = M @ block @ M.T, as in JPEG


_R = 1 + max(max(uv) for uv in _COEFFS)  # only the lowest _R frequencies per axis are ever computed
_A = _dct_matrix()[:_R].astype(np.float32)  # (_R, 8)
_CARRIER = np.zeros((_R, _R), dtype=bool)
for _u, _v in _COEFFS:
    _CARRIER[_u, _v] = True
_CARRIER_F = _CARRIER.astype(np.float32)[None, :, None, :]  # broadcasts over (blocks_y, _R, blocks_x, _R)


@functools.lru_cache(maxsize=8)
def _layout(blocks_y: int, blocks_x: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each coefficient of the (blocks_y, _R, blocks_x, _R) array: the codeword bit it carries (CODE_BITS for
    non-carriers), its dither in [0, 1); and the number of slots per bit.

    Depends only on the block grid, so embedder and extractor agree; cached because the service sees few sizes
    (1080p: 2.6 MB per entry; bit indices as uint8 keep even a 40-Mpixel entry under 30 MB).
    """
    shape = (blocks_y, _R, blocks_x, _R)
    carrier = np.broadcast_to(_CARRIER[None, :, None, :], shape)
    slots = int(carrier.sum())
    rng = _rng(b"layout")
    bit_of_slot = np.full(shape, CODE_BITS, dtype=np.uint8)
    # Keyed permutation then modulo: each bit gets slots//80 or +1 slots, scattered over the whole image.
    bit_of_slot[carrier] = rng.permutation(slots) % CODE_BITS
    dither = rng.random(shape, dtype=np.float32)
    counts = np.bincount(bit_of_slot.ravel(), minlength=CODE_BITS + 1)[:CODE_BITS]
    for array in (bit_of_slot, dither, counts):
        array.flags.writeable = False
    return bit_of_slot, dither, counts


def _block_grid(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0] // 8, shape[1] // 8


def _capacity_ok(blocks_y: int, blocks_x: int) -> bool:
    return blocks_y * blocks_x * len(_COEFFS) >= _MIN_REPEATS * CODE_BITS


def _low_coefficients(rgb: np.ndarray, blocks_y: int, blocks_x: int) -> np.ndarray:
    """(blocks_y, _R, blocks_x, _R) float32: the low-frequency luma DCT coefficients of every block.

    Two batched matmuls on the image layout itself: no block transpose copy, no full 64-coefficient DCT.
    """
    region = rgb[: blocks_y * 8, : blocks_x * 8]
    # OpenCV's BT.601 luma, rounded to uint8: 10x faster than float math; the rounding (+-0.5) is noise far
    # below the QIM tolerance (STEP/4).
    luma = cv2.cvtColor(region, cv2.COLOR_RGB2GRAY).astype(np.float32)
    rows = np.matmul(_A, luma.reshape(blocks_y, 8, blocks_x * 8))  # (by, _R, bx*8)
    return np.matmul(rows.reshape(blocks_y, _R, blocks_x, 8), _A.T)  # (by, _R, bx, _R)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)  # OpenCV needs packed pixels; a no-op for the usual C-contiguous input


def embed_watermark(rgb: np.ndarray, watermark_id: int, strength: float = 1.0) -> np.ndarray:
    """A copy of ``rgb`` (HxWx3 uint8) carrying ``watermark_id`` (0 <= id < 2**64).

    ``strength`` in (0.5, 1] is the fraction of the way each carrier moves onto its QIM lattice point (distortion
    compensation): 1 is the most robust (~42 dB PSNR), lower trades robustness for PSNR (0.7: ~45 dB).
    Images too small to carry the mark (fewer than ~160 carrier slots, i.e. under about 48x48) come back unchanged.
    """
    arr = _check_rgb(rgb)
    if not 0 <= int(watermark_id) < 1 << PAYLOAD_BITS:
        raise ValueError(f"watermark id must fit in {PAYLOAD_BITS} bits")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    blocks_y, blocks_x = _block_grid(arr.shape)
    if not _capacity_ok(blocks_y, blocks_x):
        return arr.copy()
    bit_of_slot, dither, _ = _layout(blocks_y, blocks_x)
    code = np.append(_encode_bits(int(watermark_id)), 0).astype(np.float32)  # + a dummy bit for non-carriers
    coeffs = _low_coefficients(arr, blocks_y, blocks_x)
    # Dithered QIM: move c to the nearest STEP * (k + dither + bit/2).
    scaled = coeffs * (1.0 / _STEP) - dither - 0.5 * code[bit_of_slot]
    change = (np.rint(scaled) - scaled) * (_STEP * strength) * _CARRIER_F
    # Back to pixels: delta = A.T @ change @ A per block, again as two batched matmuls in image layout.
    cols = np.matmul(change, _A).reshape(blocks_y, _R, blocks_x * 8)
    delta = np.matmul(_A.T, cols).reshape(blocks_y * 8, blocks_x * 8)
    # Same delta on R, G and B: BT.601 luma weights sum to 1, so luma moves by delta and JPEG/WebP chroma (Cb, Cr)
    # not at all. cv2.add rounds and saturates; per channel to avoid a 3-channel float temporary.
    height, width = blocks_y * 8, blocks_x * 8
    region = arr[:height, :width]
    marked = cv2.merge([cv2.add(channel, delta, dtype=cv2.CV_8U) for channel in cv2.split(region)])
    if region.shape == arr.shape:
        return marked
    out = arr.copy()  # ragged border (< 8 px) stays as it was
    out[:height, :width] = marked
    return out


def _soft_votes(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per codeword bit: (sum of slot votes, number of slots); vote = +1 on the bit-0 lattice, -1 on bit-1."""
    blocks_y, blocks_x = _block_grid(arr.shape)
    if not _capacity_ok(blocks_y, blocks_x):
        return None
    bit_of_slot, dither, counts = _layout(blocks_y, blocks_x)
    coeffs = _low_coefficients(arr, blocks_y, blocks_x)
    votes = np.cos((2 * np.pi) * (coeffs * (1.0 / _STEP) - dither))  # bit-1 lattice is half a step away: cos = -1
    sums = np.bincount(bit_of_slot.ravel(), weights=votes.ravel(), minlength=CODE_BITS + 1)[:CODE_BITS]
    return sums, counts


def extract_watermark(rgb: np.ndarray) -> WatermarkReading:
    """Blind read of the id; ``present`` only when the CRC checks and the votes are far from chance."""
    arr = _check_rgb(rgb)
    result = _soft_votes(arr)
    if result is None:
        return WatermarkReading(False, None, 0.0)
    sums, counts = result
    confidence = float(np.mean(np.abs(sums) / counts))
    # Under "no mark" each vote is cos of a uniform phase: mean 0, variance 1/2.
    z = np.abs(sums) / np.sqrt(0.5 * counts)
    if float(np.mean(z)) < _Z_THRESHOLD:
        return WatermarkReading(False, None, confidence)
    value = _chase_decode(sums, z)
    if value is None:
        return WatermarkReading(False, None, confidence)
    return WatermarkReading(True, format_watermark_id(value), confidence)


def _chase_decode(sums: np.ndarray, z: np.ndarray) -> int | None:
    """Hard decision first; then flip subsets of the least reliable bits, cheapest (lowest total |z|) first."""
    hard = (sums < 0).astype(np.uint8)
    weakest = np.argsort(z, kind="stable")[:_CHASE_BITS]
    flips = sorted(itertools.product((0, 1), repeat=_CHASE_BITS),
                   key=lambda mask: float(np.dot(mask, z[weakest])))
    for mask in flips:  # the all-zero mask (no flip) sorts first
        candidate = hard.copy()
        candidate[weakest] ^= np.asarray(mask, dtype=np.uint8)
        value = _decode_bits(candidate)
        if value is not None:
            return value
    return None
