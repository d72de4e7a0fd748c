"""Blind invisible watermark (v2): a 64-bit id in a tiled luma pattern that survives JPEG, resize, crop, brightness.

Design (all of it keyed by ``_KEY``; embedder and extractor must agree on every constant below):

* Payload: 64-bit id + CRC-24, convolutionally encoded (constraint length 7, rate 1/2, the 171/133 code, zero
  tail): (64 + 24 + 6) * 2 = 188 code bits, decoded by soft-decision Viterbi.
* Tile: 33 x 33 "chips". A keyed quarter of them are a fixed pilot, the rest carry the code bits (each bit on ~4
  chips), every chip times a keyed +-1 spreading sign. The tile is rendered band-limited (exact periodic sinc
  interpolation of the chips) at P = 33 * c pixels and repeated over the whole image from its top-left corner.
  The chip size c grows with the image (4 px at 1080p, >= 3.3 px from ~270 px up), so the pattern keeps its
  place in the image's spectrum under resizing and still has >= 1.6 px chips after a 0.5x downscale.
* Luma only, the same change in R, G and B: JPEG/WebP chroma subsampling cannot hurt it, colours do not shift.
* Perceptual mask: amplitude follows local texture (hair, fabric: up to 4 grey levels; smooth skin and walls:
  0.7), and the mark's RMS is capped at ``_RMS_CAP`` grey levels, so PSNR >= 39 dB whatever the content.
* Extraction is blind and finds its own synchronisation. Resize and crop leave the pattern periodic, with a new
  period and an unknown phase. The luma minus an edge-preserving smoothing of itself (a residual where the mark
  is strong and the image weak) has autocorrelation peaks on the period lattice: a comb search gives the period,
  a least-squares fit of the sub-pixel peak positions refines it per axis. Folding the residual modulo the
  period averages all tiles into one; circular correlation of the folded tile with the pilot gives the phase
  (crop offset) to a fraction of a chip. Per-frequency gains measured on the pilot drive an MMSE equaliser that
  trusts the frequencies the attack (JPEG, downscaling) left intact; the chips are despread and Viterbi-decoded.
* ``present`` needs the pilot correlation peak far above chance (``_PILOT_Z``) *and* the CRC-24 to check, so
  photos, noise, periodic textures and flat images read as absent.
* Re-marking an image that already carries a mark at its own size (the service's output used as the next
  target) first detects the earlier id cheaply and subtracts its pattern, so the new id replaces it.
* Not handled (outside the specification): rotation, flips, aspect-changing resizes, downscaling below ~0.45x.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

PAYLOAD_BITS = 64
CRC_BITS = 24
INFO_BITS = PAYLOAD_BITS + CRC_BITS
_K = 7  # convolutional code constraint length
_POLYS = (0o171, 0o133)  # generator polynomials (the NASA/CCSDS rate-1/2 code)
CODE_BITS = (INFO_BITS + _K - 1) * len(_POLYS)  # 188 channel bits

_KEY = b"facefuse-watermark-v2"
_N = 33  # chips per tile side; odd, so the chip spectrum has no Nyquist bin and render/demodulate are exact
_PILOT_FRACTION = 0.25  # pilot chips: sync (phase) and channel estimation; the rest carry data

# Chip size in px = max(_MIN_CHIP, min(short_side / 80, _MID_CHIP), short_side / _CHIP_DIVISOR): proportional
# from 891 px up (4 px at 1080p: survives 0.5x + JPEG q75, invisible at 1x), at least 3.3 px for ordinary sizes,
# and only small images (which cannot survive a 2x downscale anyway) go down to 2 px.
_CHIP_DIVISOR = 270.0
_MID_CHIP = 3.3
_MIN_CHIP = 2.0

_RMS_CAP = 2.8  # grey levels: PSNR = 20 * log10(255 / 2.8) = 39.2 dB at most, less on smooth images
_MASK_GAIN = 1.0  # amplitude per grey level of local detail ...
_MASK_MIN = 0.7  # ... clipped to this on smooth areas (skin: visibility) ...
_MASK_MAX = 4.0  # ... and this on busy ones (more buys nothing: the extractor normalises busy areas down)

_ANALYSIS_SIDE = 1024  # extraction works on the luma downscaled to about this long side (speed) ...
_ANALYSIS_CHIP = 2.0  # ... unless that would make the expected chip smaller than this (px)
_SAMPLES_PER_CHIP = 4  # resolution of the folded tile
_BILATERAL_COLOUR = 6.0  # grey levels: differences above this are image structure, below it mark and noise
_PREEMPHASIS_SIGMA = 2.5  # analysis px: the residual filter is modelled as a Gaussian high-pass of this width
_PREEMPHASIS_FLOOR = 0.05
# Pilot correlation peak, in robust standard deviations of the whole correlation surface (the max of ~10^3
# correlated values per hypothesis). Unmarked images: median ~3.9, max 5.7 over ~1,100 photos, crops, resizes,
# noise, periodic textures and gradients; marked ones: 12-15 from ~300 px up, 8-12 at 100-200 px. The CRC-24
# behind it is what makes a false "present" negligible (2^-24 per hypothesis that passes this gate).
_PILOT_Z = 6.0
_CANDIDATES = 3  # period hypotheses from the autocorrelation (plus the nominal one for the image's size)
_MIN_SIDE = 48  # smaller images are neither marked nor read


@dataclass(frozen=True)
class WatermarkReading:
    present: bool
    watermark_id: str | None  # 16 lowercase hex digits when present
    confidence: float  # 0..1 when present: 2 * (fraction of raw code bits agreeing with the decoded id) - 1; else 0


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


# ---------------------------------------------------------------------------------------------------------------
# Payload coding: CRC-24 + convolutional code; soft-decision Viterbi.


def _crc24(data: bytes) -> int:
    """CRC-24/OpenPGP (poly 0x864CFB, init 0xB704CE)."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


_STATES = 1 << (_K - 1)
# Encoder register = (input bit << 6) | state, where state = the previous 6 inputs, newest in bit 5; the next
# state is register >> 1. Output j is the parity of register & _POLYS[j].
_REGISTERS = np.arange(2 * _STATES)
_OUTPUTS = np.array([[bin(r & g).count("1") & 1 for g in _POLYS] for r in _REGISTERS], dtype=np.uint8)
_OUTPUT_SIGNS = 1.0 - 2.0 * _OUTPUTS  # code bit 0 -> +1, as the soft values
# The two registers that lead to each next state ns are (ns << 1) | b, b = 0, 1; the input bit was ns >> 5.
_PRED_REG = np.stack([(np.arange(_STATES) << 1) | b for b in (0, 1)], axis=1)  # (64, 2)
_PRED_STATE = _PRED_REG & (_STATES - 1)


def _info_bits(watermark_id: int) -> np.ndarray:
    payload = watermark_id.to_bytes(8, "big")
    return np.unpackbits(np.frombuffer(payload + _crc24(payload).to_bytes(3, "big"), dtype=np.uint8))


def _encode_bits(watermark_id: int) -> np.ndarray:
    """The CODE_BITS channel bits (0/1) that carry ``watermark_id``."""
    state, out = 0, []
    for bit in np.concatenate([_info_bits(watermark_id), np.zeros(_K - 1, np.uint8)]):
        register = (int(bit) << (_K - 1)) | state
        out.append(_OUTPUTS[register])
        state = register >> 1
    return np.concatenate(out)


def _viterbi(soft: np.ndarray) -> np.ndarray:
    """Most likely INFO_BITS info bits for soft code bits (> 0 means 0), by maximum correlation."""
    branch = soft.reshape(-1, len(_POLYS)).astype(np.float64) @ _OUTPUT_SIGNS.T  # (steps, 128)
    metric = np.full(_STATES, -np.inf)
    metric[0] = 0.0  # the encoder starts in state 0
    choices = np.empty((len(branch), _STATES), dtype=np.intp)
    rows = np.arange(_STATES)
    for step, gains in enumerate(branch):
        candidates = metric[_PRED_STATE] + gains[_PRED_REG]  # (64, 2)
        choices[step] = np.argmax(candidates, axis=1)
        metric = candidates[rows, choices[step]]
    state, bits = 0, np.empty(len(branch), dtype=np.uint8)  # the zero tail ends in state 0
    for step in range(len(branch) - 1, -1, -1):
        bits[step] = state >> (_K - 2)
        state = int(_PRED_STATE[state, choices[step, state]])
    return bits[:INFO_BITS]


def _decode_id(soft: np.ndarray) -> int | None:
    raw = np.packbits(_viterbi(soft)).tobytes()
    payload, crc = raw[:8], int.from_bytes(raw[8:11], "big")
    return int.from_bytes(payload, "big") if _crc24(payload) == crc else None


# ---------------------------------------------------------------------------------------------------------------
# Tile layout and rendering.


def _rng(label: bytes) -> np.random.Generator:
    seed = int.from_bytes(hashlib.sha256(_KEY + b"/" + label).digest()[:16], "big")
    return np.random.Generator(np.random.PCG64(seed))


def _make_layout() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per chip (N x N): the code bit it carries (-1: pilot) and its +-1 spreading sign; and the pilot mask."""
    rng = _rng(b"layout")
    order = rng.permutation(_N * _N)  # keyed scatter: a bit's chips are far apart, so local damage spreads thin
    pilots = int(round(_PILOT_FRACTION * _N * _N))
    bit_of_chip = np.full(_N * _N, -1, dtype=np.intp)
    bit_of_chip[order[pilots:]] = np.arange(_N * _N - pilots) % CODE_BITS
    sign = rng.integers(0, 2, _N * _N).astype(np.float64) * 2 - 1
    return bit_of_chip.reshape(_N, _N), sign.reshape(_N, _N), (bit_of_chip < 0).reshape(_N, _N)


_BIT_OF_CHIP, _CHIP_SIGN, _PILOT_MASK = _make_layout()
_DATA_BITS = _BIT_OF_CHIP[~_PILOT_MASK]
_DATA_SIGN = _CHIP_SIGN[~_PILOT_MASK]
_BAND = np.fft.fftfreq(_N, 1.0 / _N).astype(np.intp)  # frequencies of the chip spectrum, cycles per tile
_PILOT_SPECTRUM = np.fft.fft2(np.where(_PILOT_MASK, _CHIP_SIGN, 0.0))
_RING = np.rint(np.hypot(_BAND[:, None], _BAND[None, :])).astype(np.intp)  # radial frequency of each bin
_RING_SIZE = np.bincount(_RING.ravel())


def _render(chips: np.ndarray, size: int) -> np.ndarray:
    """Exact periodic band-limited interpolation of an N x N chip array to size x size samples, unit RMS.

    Zero-padding the spectrum keeps the tile seamlessly periodic and puts no energy above the chip rate, where it
    would be both the most visible and the first to go in JPEG or downscaling. Separable: the tile is B C B^T with
    B the (size, N) periodic sinc interpolation matrix (``_interpolation_matrix``), the same values as zero-padding
    the FFT (to float rounding) for a fraction of the work: every request with a new id renders its tile.
    """
    basis = _interpolation_matrix(size)
    tile = basis @ (chips - chips.mean()) @ basis.T
    return (tile / np.sqrt(np.mean(tile**2))).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _interpolation_matrix(size: int) -> np.ndarray:
    """(size, N): sample t of the band-limited periodic signal through chip values c_n is sum_n B[t, n] c_n, with
    B[t, n] = sum over the chip band's frequencies k of cos(2 pi k (t / size - n / N)) (the band is symmetric, N odd:
    no Nyquist bin, so the interpolation is real), up to a scale the unit-RMS normalisation removes."""
    phase = np.arange(size)[:, None] / size - np.arange(_N)[None, :] / _N
    basis = np.cos(2.0 * np.pi * _BAND[None, None, :] * phase[:, :, None]).sum(axis=-1)
    basis.flags.writeable = False
    return basis


@functools.lru_cache(maxsize=64)
def _tile(watermark_id: int, size: int) -> np.ndarray:
    code = _encode_bits(watermark_id).astype(np.float64)
    chips = _CHIP_SIGN.copy()
    chips[~_PILOT_MASK] *= 1.0 - 2.0 * code[_DATA_BITS]
    tile = _render(chips, size)
    tile.flags.writeable = False
    return tile


def _period(height: int, width: int) -> int:
    """Tile period in px for an image of this size; an integer, so that the tile repeats exactly."""
    side = min(height, width)
    chip = max(_MIN_CHIP, min(side / 80.0, _MID_CHIP), side / _CHIP_DIVISOR)
    return int(round(_N * chip))


# ---------------------------------------------------------------------------------------------------------------
# Embedding.


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)  # OpenCV needs packed pixels; a no-op for the usual C-contiguous input


# Local detail = |luma - GaussianBlur(luma, (5, 5), 1.2)|, averaged down to 1/8 resolution.
DETAIL_KSIZE, DETAIL_SIGMA, AMPLITUDE_REDUCTION = 5, 1.2, 8


def _amplitude(luma: np.ndarray) -> np.ndarray:
    """Mark amplitude (grey levels) from local detail, at 1/8 resolution: cheap, and smooth by construction."""
    height, width = luma.shape
    detail = cv2.absdiff(luma, cv2.GaussianBlur(luma, (DETAIL_KSIZE, DETAIL_KSIZE), DETAIL_SIGMA))
    size = (max(1, width // AMPLITUDE_REDUCTION), max(1, height // AMPLITUDE_REDUCTION))
    return _amplitude_from_detail(cv2.resize(detail, size, interpolation=cv2.INTER_AREA))


def _amplitude_from_detail(small_detail: np.ndarray) -> np.ndarray:
    """The amplitude map from the 1/8-resolution uint8 detail map (also used by the torch path)."""
    small = cv2.GaussianBlur(small_detail.astype(np.float32), (5, 5), 1.0)
    return np.clip(small * _MASK_GAIN, _MASK_MIN, _MASK_MAX)


def _check_mark_arguments(watermark_id: int, strength: float) -> None:
    if not 0 <= int(watermark_id) < 1 << PAYLOAD_BITS:
        raise ValueError(f"watermark id must fit in {PAYLOAD_BITS} bits")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")


def _capped(amplitude: np.ndarray, strength: float) -> np.ndarray:
    # The pattern has unit RMS and is independent of the mask, so the mark's RMS is the mask's: cap it (PSNR).
    rms = float(np.sqrt(np.mean(amplitude * amplitude)))
    return amplitude * (strength * min(1.0, _RMS_CAP / rms))


def _mark_tile(watermark_id: int, period: int, earlier: tuple[int, float] | None, mean_amplitude: float) -> np.ndarray:
    """The tile to add; re-marking (e.g. the service's output used again as a target) replaces an earlier mark
    rather than mixing two ids that would garble each other."""
    tile = _tile(int(watermark_id), period)
    if earlier is not None:
        old_id, old_amplitude = earlier
        tile = tile - _tile(old_id, period) * min(1.5, old_amplitude / mean_amplitude)
    return tile


def embed_watermark(rgb: np.ndarray, watermark_id: int, strength: float = 1.0) -> np.ndarray:
    """A copy of ``rgb`` (HxWx3 uint8) carrying ``watermark_id`` (0 <= id < 2**64).

    ``strength`` in (0, 1] scales the mark's amplitude: 1 is the most robust (PSNR >= 39 dB), lower trades
    robustness for PSNR (0.7: >= 42 dB). Images with a side under 48 px come back unchanged (too small to carry
    the mark).
    """
    arr = _check_rgb(rgb)
    _check_mark_arguments(watermark_id, strength)
    height, width = arr.shape[:2]
    if min(height, width) < _MIN_SIDE:
        return arr.copy()
    period = _period(height, width)
    luma = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    amplitude = _capped(_amplitude(luma), strength)
    tile = _mark_tile(watermark_id, period, _earlier_mark(luma, period), float(np.mean(amplitude)))
    amplitude = cv2.resize(amplitude, (width, height), interpolation=cv2.INTER_LINEAR)
    # Bands of whole tile rows share one pattern band: memory stays ~5 bytes/px even at 40 Mpx, and the
    # per-band temporaries stay in cache.
    band = period * max(1, 256 // period)
    pattern = cv2.repeat(tile, band // period, -(-width // period))[:, :width]
    out = np.empty_like(arr)
    for top in range(0, height, band):
        rows = slice(top, min(height, top + band))
        delta = cv2.multiply(amplitude[rows], pattern[: rows.stop - top])
        # Same delta on R, G and B: BT.601 luma weights sum to 1, so luma moves by delta and chroma not at all.
        # cv2.add rounds and saturates.
        out[rows] = cv2.add(arr[rows], cv2.merge([delta, delta, delta]), dtype=cv2.CV_8U)
    return out


# The re-marking check resamples each tile to 2 samples per chip and high-passes it (minus a Gaussian of this sigma).
EARLIER_MARK_SAMPLES = 2 * _N
EARLIER_MARK_SIGMA = 2.0


def _earlier_mark(luma: np.ndarray, period: int) -> tuple[int, float] | None:
    """(id, mean amplitude in grey levels) of a mark already in this image at its own period and phase, or None.

    Cheap (a few ms at 1080p): the luma is area-resampled to 2 samples per chip, high-passed and folded over the
    whole tiles, without the extractor's period search or bilateral residual.
    """
    tiles_y, tiles_x = luma.shape[0] // period, luma.shape[1] // period
    if tiles_y * tiles_x == 0:
        return None
    region = luma[: tiles_y * period, : tiles_x * period]
    size = EARLIER_MARK_SAMPLES
    small = cv2.resize(region, (tiles_x * size, tiles_y * size), interpolation=cv2.INTER_AREA)
    return _earlier_mark_from(small, period)



def _earlier_mark_from(small: np.ndarray, period: int) -> tuple[int, float] | None:
    """``_earlier_mark`` from the whole tiles already area-resampled to EARLIER_MARK_SAMPLES per tile side
    (also used by the torch path)."""
    size = EARLIER_MARK_SAMPLES
    tiles_y, tiles_x = small.shape[0] // size, small.shape[1] // size
    small = small.astype(np.float32)
    small -= cv2.GaussianBlur(small, (0, 0), EARLIER_MARK_SIGMA)
    return _earlier_mark_of_fold(small.reshape(tiles_y, size, tiles_x, size).mean(axis=(0, 2)), period)


def _earlier_mark_of_fold(folded: np.ndarray, period: int) -> tuple[int, float] | None:
    """``_earlier_mark`` from the high-passed samples already folded into one EARLIER_MARK_SAMPLES-square tile (the
    torch path folds on the device)."""
    size, sigma = EARLIER_MARK_SAMPLES, EARLIER_MARK_SIGMA
    z, soft = _demodulate(folded, size, size)
    old_id = _decode_id(soft) if z >= _PILOT_Z else None
    if old_id is None:
        return None
    # Amplitude: least squares of the fold on the old tile's spectrum, through the high-pass's response, over
    # mid rings. Sample j of the fold is centred on tile position j + shift (area resampling).
    shift = 0.5 * (1.0 - size / period)
    phase = np.exp(2j * np.pi * (_BAND[:, None] + _BAND[None, :]) * shift / size)
    response = 1.0 - np.exp(-2 * np.pi**2 * sigma**2 * (_RING / size) ** 2)
    expected = _band_of(np.fft.fft2(_tile(old_id, size))) * phase * response
    observed = _band_of(np.fft.fft2(folded))
    rings = (_RING >= 4) & (_RING <= 12)
    amplitude = float(np.sum((observed * np.conj(expected)).real[rings]) / np.sum(np.abs(expected[rings]) ** 2))
    return old_id, max(0.0, amplitude)


# ---------------------------------------------------------------------------------------------------------------
# Extraction: residual -> period (autocorrelation) -> fold -> phase (pilot) -> equalise -> despread -> Viterbi.


def _residual(luma: np.ndarray) -> np.ndarray:
    """Luma minus an edge-preserving (bilateral) smoothing of itself: edges and texture much stronger than the
    mark stay out, the mark (a few grey levels) goes in; then divided by the local residual energy, so that busy
    regions do not dominate (the mark's amplitude follows texture there, so this is close to SNR weighting)."""
    high = luma - cv2.bilateralFilter(luma, 7, _BILATERAL_COLOUR, 3.0)
    energy = cv2.GaussianBlur(high * high, (0, 0), 2.0)
    return np.clip(high / np.sqrt(energy + 1.0), -3.0, 3.0)


def _autocorrelation(residual: np.ndarray) -> np.ndarray:
    """Circular autocorrelation, normalised to 1 at lag 0; lags (dy, dx) index it modulo its shape."""
    height, width = residual.shape
    padded = np.zeros((cv2.getOptimalDFTSize(height), cv2.getOptimalDFTSize(width)), np.float32)
    padded[:height, :width] = residual - residual.mean()
    spectrum = cv2.dft(padded)  # CCS-packed: real input, half the work of a complex transform
    acf = cv2.idft(cv2.mulSpectrums(spectrum, spectrum, 0, conjB=True), flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)
    return acf / max(float(acf[0, 0]), 1e-12)


def _sample(acf: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples of the circular autocorrelation at fractional lags."""
    height, width = acf.shape
    y0, x0 = np.floor(ys).astype(np.intp), np.floor(xs).astype(np.intp)
    fy, fx = ys - y0, xs - x0
    y0, x0 = y0 % height, x0 % width
    y1, x1 = (y0 + 1) % height, (x0 + 1) % width
    return ((1 - fy) * ((1 - fx) * acf[y0, x0] + fx * acf[y0, x1])
            + fy * ((1 - fx) * acf[y1, x0] + fx * acf[y1, x1]))


def _lattice(shape: tuple[int, int], period_y: float, period_x: float,
             reach: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Lattice points (ky, kx): one of each +- pair (the ACF is symmetric), off the axes (image structure makes
    ridges along them), and within 60% of the image (beyond that the circular wrap-around dominates)."""
    ky, kx = np.meshgrid(np.arange(-reach, reach + 1), np.arange(1, reach + 1), indexing="ij")
    ky, kx = ky.ravel(), kx.ravel()
    keep = (ky != 0) & (np.abs(ky) * period_y <= 0.6 * shape[0]) & (kx * period_x <= 0.6 * shape[1])
    return ky[keep], kx[keep]


def _period_candidates(acf: np.ndarray, shape: tuple[int, int], low: float, high: float) -> list[tuple[float, float]]:
    """The most likely (period_y, period_x), best first, from the lattice of autocorrelation peaks."""
    periods = np.arange(low, high, 0.25)
    # Comb score of every candidate period at once: the mean ACF over the lattice points near the origin.
    ky, kx = np.meshgrid(np.arange(-4, 5), np.arange(1, 5), indexing="ij")
    off_axis = ky.ravel() != 0
    ky, kx = ky.ravel()[off_axis], kx.ravel()[off_axis]
    ys, xs = np.outer(periods, ky), np.outer(periods, kx)
    keep = (np.abs(ys) <= 0.6 * shape[0]) & (xs <= 0.6 * shape[1])
    counts = keep.sum(axis=1)
    scores = np.where(counts >= 2, np.where(keep, _sample(acf, ys, xs), 0.0).sum(axis=1) / np.maximum(counts, 1),
                      -np.inf)
    picked: list[float] = []
    for index in np.argsort(-scores):
        if not np.isfinite(scores[index]) or len(picked) == _CANDIDATES:
            break
        if all(abs(periods[index] - other) > 0.03 * other for other in picked):
            picked.append(float(periods[index]))
    return [_refine(acf, shape, period, period) for period in picked]


def _refine(acf: np.ndarray, shape: tuple[int, int], period_y: float, period_x: float) -> tuple[float, float]:
    """Per-axis period to a small fraction of a pixel: least squares over the sub-pixel positions of the lattice
    peaks. Folding ~15 tiles needs it: a 0.1% period error smears the far tiles by a third of a chip."""
    height, width = acf.shape
    offsets = np.arange(-2, 3)
    for _ in range(2):
        ky, kx = _lattice(shape, period_y, period_x)
        if len(ky) < 2:
            break
        iy, ix = np.rint(ky * period_y).astype(np.intp), np.rint(kx * period_x).astype(np.intp)
        window = acf[(iy[:, None, None] + offsets[None, :, None]) % height,
                     (ix[:, None, None] + offsets[None, None, :]) % width]  # 5x5 around each expected peak
        oy, ox = np.divmod(window.reshape(len(ky), -1).argmax(axis=1), 5)
        inside = (oy > 0) & (oy < 4) & (ox > 0) & (ox < 4)
        oy, ox = np.clip(oy, 1, 3), np.clip(ox, 1, 3)
        rows = np.arange(len(ky))
        centre = window[rows, oy, ox]

        def vertex(minus: np.ndarray, plus: np.ndarray, centre: np.ndarray = centre) -> np.ndarray:
            curvature = minus - 2 * centre + plus
            return np.where(curvature < 0, 0.5 * (minus - plus) / np.where(curvature < 0, curvature, -1.0), 0.0)

        y = iy + oy - 2 + vertex(window[rows, oy - 1, ox], window[rows, oy + 1, ox])
        x = ix + ox - 2 + vertex(window[rows, oy, ox - 1], window[rows, oy, ox + 1])
        # Only peaks that stand out from the ACF's background count, stronger ones more.
        floor = 3.0 * float(np.std(_sample(acf, (ky + 0.5) * period_y, (kx + 0.5) * period_x)))
        weight = np.where(inside, np.maximum(centre - floor, 0.0), 0.0)
        if np.sum(weight * ky * ky) <= 0 or np.sum(weight * kx * kx) <= 0:
            break
        period_y = float(np.sum(weight * ky * y) / np.sum(weight * ky * ky))
        period_x = float(np.sum(weight * kx * x) / np.sum(weight * kx * kx))
    return period_y, period_x


def _fold(residual: np.ndarray, period_y: float, period_x: float) -> np.ndarray:
    """Average of all tiles: resample so that one period is exactly N * _SAMPLES_PER_CHIP, then sum modulo it."""
    size = _N * _SAMPLES_PER_CHIP
    height, width = residual.shape
    new_h, new_w = max(1, round(height * size / period_y)), max(1, round(width * size / period_x))
    shrink = new_h * new_w < height * width
    scaled = cv2.resize(residual, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    padded = np.pad(scaled, ((0, -new_h % size), (0, -new_w % size)))
    total = padded.reshape(padded.shape[0] // size, size, padded.shape[1] // size, size).sum(axis=(0, 2))
    # Samples summed into each cell: rows with r % size == i times columns with c % size == j.
    count = np.outer(np.bincount(np.arange(new_h) % size, minlength=size),
                     np.bincount(np.arange(new_w) % size, minlength=size))
    return total / np.maximum(count, 1)


def _preemphasis(period_y: float, period_x: float) -> np.ndarray:
    """Regularised inverse of the residual filter's loss at the lowest chip frequencies (modelled as a Gaussian
    high-pass), so that the pilot correlation peak stays sharp."""
    fy, fx = _BAND[:, None] / period_y, _BAND[None, :] / period_x
    response = 1.0 - np.exp(-2 * np.pi**2 * _PREEMPHASIS_SIGMA**2 * (fy**2 + fx**2))
    return response / (response**2 + _PREEMPHASIS_FLOOR)


def _smooth_rings(values: np.ndarray) -> np.ndarray:
    kernel = np.array([1.0, 2.0, 3.0, 2.0, 1.0]) / 9.0
    return np.convolve(np.pad(values, 2, mode="edge"), kernel, "valid")


def _pilot_correlation(folded: np.ndarray, period_y: float, period_x: float) -> tuple[np.ndarray, np.ndarray]:
    """(pre-emphasised chip bands, circular correlations with the pilot on the fold's sample grid) of folded tiles
    (..., size, size), any number at once."""
    size = folded.shape[-1]
    band = np.fft.fft2(folded)[..., _BAND[:, None] % size, _BAND[None, :] % size] * _preemphasis(period_y, period_x)
    cross = np.zeros((*folded.shape[:-2], size, size), dtype=complex)
    cross[..., _BAND[:, None] % size, _BAND[None, :] % size] = band * np.conj(_PILOT_SPECTRUM)
    return band, np.real(np.fft.ifft2(cross))


def _z_scores(corr: np.ndarray) -> np.ndarray:
    """The correlation peak of each (size x size) surface in robust standard deviations of the whole surface."""
    flat = corr.reshape(*corr.shape[:-2], -1)
    median = np.median(flat, axis=-1)
    spread = 1.4826 * np.median(np.abs(flat - median[..., None]), axis=-1) + 1e-12
    return (flat.max(axis=-1) - median) / spread


def _pilot_z(folded: np.ndarray, period: float) -> np.ndarray:
    """``_demodulate``'s pilot z-score of each of several folded tiles (n, size, size), in one vectorised pass."""
    return _z_scores(_pilot_correlation(folded, period, period)[1])


def _demodulate(folded: np.ndarray, period_y: float, period_x: float) -> tuple[float, np.ndarray]:
    """(pilot z-score, soft code bits) of a folded tile."""
    size = folded.shape[0]
    # Phase: circular correlation with the pilot on the fold's sample grid; z against the whole surface.
    band, corr = _pilot_correlation(folded, period_y, period_x)
    sy, sx = divmod(int(np.argmax(corr)), size)
    z = float(_z_scores(corr))

    def vertex(minus: float, centre: float, plus: float) -> float:
        curvature = minus - 2 * centre + plus
        return 0.0 if curvature >= 0 else float(np.clip(0.5 * (minus - plus) / curvature, -0.5, 0.5))

    dy = sy + vertex(corr[sy - 1, sx], corr[sy, sx], corr[(sy + 1) % size, sx])
    dx = sx + vertex(corr[sy, sx - 1], corr[sy, sx], corr[sy, (sx + 1) % size])
    # Undo the shift (a linear phase, sub-sample): the band is then the chip array's spectrum times the channel.
    band = band * np.exp(2j * np.pi * (_BAND[:, None] * dy + _BAND[None, :] * dx) / size)
    # Channel gain per radial frequency from the known pilot, noise power from what the gain does not explain,
    # both smoothed across neighbouring rings; then the MMSE equaliser gain / (gain^2 + noise / signal).
    pilot_power = np.bincount(_RING.ravel(), (np.abs(_PILOT_SPECTRUM) ** 2).ravel())
    gain = np.bincount(_RING.ravel(), (band * np.conj(_PILOT_SPECTRUM)).real.ravel()) / np.maximum(pilot_power, 1e-9)
    power = np.bincount(_RING.ravel(), (np.abs(band) ** 2).ravel()) / _RING_SIZE
    gain, power = _smooth_rings(gain), _smooth_rings(power)
    chip_power = float(_N * _N)  # E|chip spectrum|^2 per bin for N*N random +-1 chips
    noise = np.maximum(power - gain**2 * chip_power, 1e-3 * power + 1e-12)
    equaliser = gain / (gain**2 + noise / chip_power)
    equaliser[0] = 0.0  # DC: the image's own brightness, no mark
    chips = np.real(np.fft.ifft2(band * equaliser[_RING]))
    return z, np.bincount(_DATA_BITS, weights=chips[~_PILOT_MASK] * _DATA_SIGN, minlength=CODE_BITS)


def _band_of(spectrum: np.ndarray) -> np.ndarray:
    """The N x N chip band (FFT order) of a larger tile spectrum."""
    return spectrum[np.ix_(_BAND % spectrum.shape[0], _BAND % spectrum.shape[1])]


@dataclass(frozen=True)
class _Detail:
    """One read with its internals (for the robustness report): the strongest hypothesis's soft code bits."""

    reading: WatermarkReading
    soft: np.ndarray | None = None
    pilot_z: float = 0.0
    period: tuple[float, float] = (0.0, 0.0)  # px of the image read


_ABSENT = _Detail(WatermarkReading(False, None, 0.0))


def _extract(rgb: np.ndarray) -> _Detail:
    arr = _check_rgb(rgb)
    height, width = arr.shape[:2]
    if min(height, width) < _MIN_SIDE:
        return _ABSENT
    # The period this image would have if it had been marked at its current size (no resize, no crop).
    nominal = _period(height, width)
    scale = min(1.0, max(_ANALYSIS_SIDE / max(height, width), _ANALYSIS_CHIP * _N / nominal))
    luma = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY).astype(np.float32)
    if scale < 1.0:
        luma = cv2.resize(luma, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    residual = _residual(luma)
    low, high = 1.3 * _N, min(residual.shape) / 1.6  # chips >= 1.3 px; >= 1.6 periods to see any lattice
    hypotheses = _period_candidates(_autocorrelation(residual), residual.shape, low, high) if high > low else []
    expected = nominal * scale
    if all(abs(py - expected) > 0.01 * expected or abs(px - expected) > 0.01 * expected for py, px in hypotheses):
        hypotheses.append((expected, expected))  # small images: too few tiles for the autocorrelation
    best = _ABSENT
    for period_y, period_x in hypotheses:
        z, soft = _demodulate(_fold(residual, period_y, period_x), period_y, period_x)
        detail = _Detail(WatermarkReading(False, None, 0.0), soft, z, (period_y / scale, period_x / scale))
        if z >= _PILOT_Z:
            value = _decode_id(soft)
            if value is not None:
                agree = float(np.mean((soft < 0) == _encode_bits(value).astype(bool)))
                reading = WatermarkReading(True, format_watermark_id(value), max(0.0, 2 * agree - 1))
                return _Detail(reading, soft, z, detail.period)
        if z > best.pilot_z:
            best = detail
    return best


def extract_watermark(rgb: np.ndarray) -> WatermarkReading:
    """Blind read of the id; ``present`` only when the pilot is found far above chance and the CRC-24 checks."""
    return _extract(rgb).reading
