"""DICOM images as float arrays in [0, 1], the way a radiologist's viewer would show them.

Pixel data -> modality LUT (RescaleSlope / RescaleIntercept or a Modality LUT Sequence) -> VOI
(the file's VOI LUT or first window, a given window, or the min-max of the modality values) ->
MONOCHROME1 inverted. All in float64, so 12/16-bit data is never squeezed through 8 bits before
the final storage. Colour files (RGB, YBR_*, PALETTE COLOR) come out as RGB scaled by their bit
depth.

Tag values are read only to compute pixels and the SOP Instance UID (for duplicate removal, kept in
memory); nothing here returns or logs a tag value, so no patient data reaches a written file.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from msd_jax.data.errors import DataError

DICOM_SUFFIX = ".dcm"
MAGIC_OFFSET, MAGIC = 128, b"DICM"
FRAME_CHOICES = ("middle", "all")
WINDOW_HELP = "'auto', 'none' or 'CENTER,WIDTH' (numbers, WIDTH >= 1)"
MONO = ("MONOCHROME1", "MONOCHROME2")

# Which pip packages decode which compressed transfer syntaxes (pydicom's pixel-data plugins).
_JPEG_HINT = "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
_JLS_HINT = "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg, or python-gdcm)"
_J2K_HINT = "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": _JPEG_HINT, "1.2.840.10008.1.2.4.51": _JPEG_HINT,
    "1.2.840.10008.1.2.4.57": _JPEG_HINT, "1.2.840.10008.1.2.4.70": _JPEG_HINT,
    "1.2.840.10008.1.2.4.80": _JLS_HINT, "1.2.840.10008.1.2.4.81": _JLS_HINT,
    "1.2.840.10008.1.2.4.90": _J2K_HINT, "1.2.840.10008.1.2.4.91": _J2K_HINT,
    "1.2.840.10008.1.2.4.201": _J2K_HINT, "1.2.840.10008.1.2.4.202": _J2K_HINT,
    "1.2.840.10008.1.2.4.203": _J2K_HINT,
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",
}
_OTHER_HINT = "a pydicom pixel-data plugin for this transfer syntax (pylibjpeg, pyjpegls or python-gdcm)"


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Window:
    """How modality values become [0, 1]: mode 'auto' | 'none' | 'fixed' (center, width)."""

    mode: str
    center: float = 0.0
    width: float = 0.0


def parse_window(value, field: str = "data.dicom_window") -> Window:
    """'auto' | 'none' | 'C,W' -> Window; ValueError naming ``field`` otherwise."""
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in ("auto", "none"):
        return Window(text)
    parts = text.split(",") if text else []
    try:
        center, width = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"config.{field}: expected {WINDOW_HELP}, got {value!r}") from None
    if not (np.isfinite(center) and np.isfinite(width) and width >= 1):
        raise ValueError(f"config.{field}: expected {WINDOW_HELP}, got {value!r} (WIDTH must be >= 1)")
    return Window("fixed", center, width)


def check_frames(value, field: str = "data.dicom_frames") -> str:
    if value not in FRAME_CHOICES:
        raise ValueError(f"config.{field}: expected one of {list(FRAME_CHOICES)}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def has_magic(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(MAGIC_OFFSET)
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def is_dicom(path: str) -> bool:
    """A ``.dcm`` file, or any file with the 'DICM' marker after its 128-byte preamble."""
    return os.fspath(path).lower().endswith(DICOM_SUFFIX) or has_magic(path)


def _read_dataset(path: str) -> pydicom.Dataset:
    # Files named .dcm without the preamble (raw datasets) are still read; others must be marked.
    try:
        return pydicom.dcmread(path, force=not has_magic(path))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
        raise DataError(
            f"{path}: cannot read DICOM file (expected a DICOM Part 10 file): {type(e).__name__}: {e}"
        ) from e


def _transfer_syntax(ds: pydicom.Dataset):
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _decode_error(path: str, ds: pydicom.Dataset, err: Exception) -> DataError:
    ts = _transfer_syntax(ds)
    name = f"{ts.name} ({ts})" if ts else "unknown (no TransferSyntaxUID in the file meta)"
    if ts is not None and ts.is_compressed:
        hint = _DECODER_HINTS.get(str(ts), _OTHER_HINT)
        expected = f"a decoder for this transfer syntax installed: {hint}"
    else:
        expected = "pixel data matching the image's Rows, Columns and Bits Allocated"
    return DataError(
        f"{path}: cannot decode pixel data of transfer syntax {name} (expected {expected}): "
        f"{type(err).__name__}: {err}"
    )


def _frame_pixels(path: str, ds: pydicom.Dataset, index: int | None) -> np.ndarray:
    # as_rgb converts YBR_* to RGB with pydicom's convert_color_space (decoders that already
    # return RGB, like JPEG baseline's, are left alone).
    try:
        return pixel_array(ds, index=index, as_rgb=True)
    except Exception as e:  # pydicom raises RuntimeError/NotImplementedError/ValueError per plugin
        raise _decode_error(path, ds, e) from e


def _photometric(path: str, ds: pydicom.Dataset) -> str:
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pi in MONO or pi == "PALETTE COLOR" or pi == "RGB" or pi.startswith("YBR"):
        return pi
    raise DataError(
        f"{path}: Photometric Interpretation {pi!r} is not supported (expected MONOCHROME1, "
        "MONOCHROME2, RGB, YBR_* or PALETTE COLOR)"
    )


def _num_frames(ds: pydicom.Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def frame_indices(num_frames: int, frames: str) -> list[int]:
    """'middle': frame num_frames // 2 (0-based); 'all': every frame."""
    check_frames(frames)
    return [num_frames // 2] if frames == "middle" else list(range(num_frames))


def read_dicom(path: str, window: str | Window = "auto", frames: str = "middle") -> list[np.ndarray]:
    """The images of one DICOM file: float32 [H, W, C] in [0, 1], C = 1 (grey) or 3 (RGB).

    ``frames``: 'middle' (one image per file) or 'all' (each frame of a multi-frame file an image).
    ``window``: see :func:`parse_window` and :func:`to_unit`.
    """
    win = window if isinstance(window, Window) else parse_window(window)
    path = os.fspath(path)
    ds = _read_dataset(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no Pixel Data element (expected an image object)")
    pi = _photometric(path, ds)
    n = _num_frames(ds)
    out = []
    for i in frame_indices(n, frames):
        px = _frame_pixels(path, ds, i if n > 1 else None)
        out.append(_to_image(path, ds, px, pi, win))
    return out


def _to_image(path: str, ds, px: np.ndarray, pi: str, win: Window) -> np.ndarray:
    if pi in MONO:
        if px.ndim != 2:
            raise DataError(f"{path}: {pi} frame has shape {px.shape} (expected rows x columns)")
        img = to_unit(ds, px, win)
        if pi == "MONOCHROME1":  # 0 is white: invert after the VOI, as the standard orders it
            img = 1.0 - img
        return img[..., None].astype(np.float32)
    return _colour(path, ds, px, pi).astype(np.float32)


def _colour(path: str, ds, px: np.ndarray, pi: str) -> np.ndarray:
    if pi == "PALETTE COLOR":
        px = apply_color_lut(px, ds)
        top = 255.0 if px.dtype == np.uint8 else 65535.0
    else:
        bits = int(ds.get("BitsStored", px.dtype.itemsize * 8) or 8)
        top = float(2**bits - 1)
    if px.ndim != 3 or px.shape[-1] != 3:
        raise DataError(f"{path}: {pi} frame has shape {px.shape} (expected rows x columns x 3)")
    return np.clip(px.astype(np.float64) / top, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Modality and VOI
# --------------------------------------------------------------------------------------------
def to_unit(ds, px: np.ndarray, win: Window) -> np.ndarray:
    """Grey pixels -> modality values -> [0, 1] (float64).

    'auto': the file's VOI LUT Sequence, else its first WindowCenter/WindowWidth (with its VOI LUT
    Function), else min-max; 'none': min-max; 'fixed': the given window, linear function.
    """
    values = np.asarray(apply_modality_lut(px, ds), dtype=np.float64)
    if win.mode == "fixed":
        return linear_window(values, win.center, win.width)
    if win.mode == "auto":
        if "VOILUTSequence" in ds:
            return _voi_lut_sequence(values, ds)
        first = _first_window(ds)
        if first is not None:
            return _window_function(values, *first, str(ds.get("VOILUTFunction", "LINEAR")).upper())
    return min_max(values)


def min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:  # a constant image carries no contrast
        return np.zeros_like(values, dtype=np.float64)
    return (values - lo) / (hi - lo)


def _first_value(v):
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return v[0] if len(v) else None
    return v


def _first_window(ds):
    center, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    try:
        center, width = float(center), float(width)
    except (TypeError, ValueError):
        return None
    return (center, width) if np.isfinite(center) and np.isfinite(width) and width > 0 else None


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 'LINEAR', output range [0, 1]."""
    width = max(float(width), 1.0)
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    mid = ((x - (center - 0.5)) / (width - 1) + 0.5) if width > 1 else (x > lo).astype(np.float64)
    return np.where(x <= lo, 0.0, np.where(x > hi, 1.0, mid))


def _window_function(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    if function == "LINEAR_EXACT":  # PS3.3 C.11.2.1.3.2
        mid = (x - center) / width + 0.5
        return np.where(x <= center - width / 2, 0.0, np.where(x > center + width / 2, 1.0, mid))
    if function == "SIGMOID":  # PS3.3 C.11.2.1.3.1
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    return linear_window(x, center, width)


def _voi_lut_sequence(values: np.ndarray, ds) -> np.ndarray:
    item = ds.VOILUTSequence[0]
    bits = int(item.LUTDescriptor[2])
    # apply_voi_lut wants the stored dtype's integers as LUT indices; modality values are whole
    # numbers whenever a VOI LUT makes sense, so rounding loses nothing.
    idx = np.rint(values).astype(np.int64)
    out = apply_voi_lut(idx, ds, index=0, prefer_lut=True).astype(np.float64)
    return np.clip(out / float(2**bits - 1), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------------------------
def sop_instance_uid(path: str) -> str:
    """The SOP Instance UID ('' when absent); kept in memory only, to find duplicate instances."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"],
                             force=not has_magic(path))
    except Exception as e:  # noqa: BLE001 - any unreadable header is reported the same way
        raise DataError(
            f"{path}: cannot read DICOM header (expected a DICOM Part 10 file): {type(e).__name__}: {e}"
        ) from e
    return str(ds.get("SOPInstanceUID", "") or "")
