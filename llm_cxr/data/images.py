"""Reading chest X-rays from disk or from bytes: PNG, JPEG and DICOM, always to 8-bit grey.

Every part of llm-cxr that touches a real image (the VQ-GAN encoder, generation, the web
app, the importers) goes through :func:`load_image` or :func:`read_image_bytes`, so a file
is interpreted the same way everywhere:

* PNG/JPEG in any PIL mode (``L``, ``RGB``, ``RGBA``, ``LA``, ``P``, ``I;16``, ``I``,
  ``F``...) become mode ``L``. Images with more than 8 bits are scaled from their actual
  value range, never clipped at 255 (a 12-bit image stored in a 16-bit PNG would otherwise
  be almost black, and one clipped at 255 almost white). JPEG EXIF orientation is applied.
* DICOM (by extension ``.dcm``/``.dicom`` or the ``DICM`` magic at byte 128) is read with
  pydicom and displayed as a radiologist's viewer would (DICOM PS3.3 C.11.2): modality LUT
  (RescaleSlope/RescaleIntercept), then the VOI window from WindowCenter/WindowWidth, or a
  VOI LUT sequence, or else the min-max range; ``MONOCHROME1`` (high value = dark) is
  inverted so that bone is always bright. Multi-frame files give their first frame.

Every failure raises :class:`llm_cxr.errors.ImageReadError` naming the file and the
problem; PIL and pydicom tracebacks never reach the user.

Hostile files are refused before they cost memory: a file is read only if it is a regular file
no larger than :func:`max_file_bytes`, and an image is decoded only if its header's pixel count
(DICOM: Rows x Columns x frames, all of which it decodes) is within :func:`max_pixels`, checked before any pixel
is decoded; a deflated DICOM is inflated only up to the bound that pixel count allows. Both limits
are set by ``LLM_CXR_MAX_PIXELS`` / ``LLM_CXR_MAX_FILE_MB`` or :func:`set_limits`.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llm_cxr.errors import ImageReadError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
_DICOM_MAGIC_OFFSET = 128
_PYLIBJPEG_HINT = (
    "install a decoder (`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg`) or "
    "decompress the file first (`gdcmconv --raw IN OUT` or `dcmdjpeg IN OUT`)"
)


# A 4300 x 3500 detector (the largest common CXR) is 15 MP; 36 MP leaves room for any radiograph while a
# 16-bit image at the limit still decodes in well under 1 GB.
_DEFAULT_MAX_PIXELS = 36_000_000
_DEFAULT_MAX_FILE_MB = 256
_limits: dict[str, int] = {}


def max_pixels() -> int:
    """Largest image (pixels, all frames and samples) decoded; ``LLM_CXR_MAX_PIXELS`` or :func:`set_limits`."""
    return _limits.get("pixels") or int(os.environ.get("LLM_CXR_MAX_PIXELS", _DEFAULT_MAX_PIXELS))


def max_file_bytes() -> int:
    """Largest image file read; ``LLM_CXR_MAX_FILE_MB`` (megabytes) or :func:`set_limits`."""
    return _limits.get("bytes") or int(float(os.environ.get("LLM_CXR_MAX_FILE_MB", _DEFAULT_MAX_FILE_MB)) * 2**20)


def set_limits(pixels: int | None = None, file_bytes: int | None = None) -> None:
    """Set the decoding limits for this process (None restores the default / environment value)."""
    for key, value in (("pixels", pixels), ("bytes", file_bytes)):
        if value is None:
            _limits.pop(key, None)
        elif value < 1:
            raise ValueError(f"{key} limit must be >= 1, got {value}")
        else:
            _limits[key] = int(value)


def _check_pixels(name: str, width: int, height: int, frames: int = 1) -> None:
    n = width * height * max(1, frames)
    if n > max_pixels():
        what = f"{width}x{height}" + (f" x {frames} frames" if frames > 1 else "")
        raise ImageReadError(f"{name}: image is {what} = {n:,} pixels, over the limit of {max_pixels():,} "
                             f"(set LLM_CXR_MAX_PIXELS to decode larger images)")


def _read_bounded(path: Path) -> bytes:
    """The whole file, if it is a regular file within the size limit (no devices, FIFOs or endless files)."""
    try:
        st = path.stat()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read the file ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"{path}: not a regular file (a device, pipe or socket cannot be an image)")
    limit = max_file_bytes()
    if st.st_size > limit:
        raise ImageReadError(f"{path}: file is {st.st_size / 2**20:.0f} MB, over the limit of {limit / 2**20:.0f} MB "
                             f"(set LLM_CXR_MAX_FILE_MB to read larger files)")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # a file that grows while read still stops here
    except OSError as e:  # permission denied, I/O error
        raise ImageReadError(f"{path}: cannot read the file ({e.strerror or e})") from e
    if len(data) > limit:
        raise ImageReadError(f"{path}: file grew past the limit of {limit / 2**20:.0f} MB while being read")
    return data


# ---- public API --------------------------------------------------------------------------

def load_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Read an image file as an 8-bit grayscale (mode ``L``) PIL image.

    ``size`` (optional) resizes with :func:`to_model_size`; ``None`` or 0 keeps the
    original size. Raises :class:`ImageReadError` if the file is missing, empty, truncated
    or not a readable image.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file does not exist")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")
    img = _decode(io.BytesIO(_read_bounded(path)), str(path), size)
    return to_model_size(img, size) if size else img


def read_image_bytes(data: bytes, name: str, size: int | None = None) -> Image.Image:
    """Decode an uploaded image (``name`` is its file name, used for DICOM detection and messages)."""
    if len(data) > max_file_bytes():
        raise ImageReadError(f"{name}: {len(data) / 2**20:.0f} MB, over the limit of "
                             f"{max_file_bytes() / 2**20:.0f} MB")
    img = _decode(io.BytesIO(data), name, size)
    return to_model_size(img, size) if size else img


def is_dicom(path_or_name: str | Path, head: bytes | None = None) -> bool:
    """True for a DICOM file: by extension, or by ``DICM`` at byte 128 of ``head``."""
    if Path(str(path_or_name)).suffix.lower() in DICOM_SUFFIXES:
        return True
    return head is not None and head[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"


def to_grayscale(img: Image.Image) -> Image.Image:
    """Any PIL image to mode ``L``; high-bit-depth images are scaled from their value range."""
    if img.mode == "L":
        return img.copy()  # a copy drops the source file name, so no one re-reads the original
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels show the black background a viewer would draw them on.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("L")


def to_model_size(img: Image.Image, size: int | None) -> Image.Image:
    """Scale so the shorter side is ``size`` and centre-crop a square; 0/None keeps the size.

    Always returns mode ``L`` (other modes go through :func:`to_grayscale`).
    """
    if size is not None and size < 0:
        raise ValueError(f"image size must be >= 0 (0 keeps the original size), got {size}")
    if img.mode != "L":
        img = to_grayscale(img)
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageReadError(f"{_name_of(img)}: image has zero size ({w}x{h})")
    if not size:
        return img
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    # Crop first, then resize: fewer pixels to filter, same result up to rounding.
    square = img.crop((left, top, left + side, top + side))
    if side == size:
        return square
    return square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)


def png_bytes(img: Image.Image, compress_level: int = 6) -> bytes:
    """Encode an image as PNG (the storage format of the dataset ``image`` column)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


# ---- decoding ----------------------------------------------------------------------------

def _name_of(img: Image.Image) -> str:
    return getattr(img, "filename", "") or "image"


def _decode(f: BinaryIO, name: str, size: int | None = None) -> Image.Image:
    head = f.read(_DICOM_MAGIC_OFFSET + 4)
    if not head:
        raise ImageReadError(f"{name}: file is empty (0 bytes)")
    f.seek(0)
    if is_dicom(name, head):
        img = _decode_dicom(f, name)
    else:
        img = _decode_pil(f, name, size)
    if img.width == 0 or img.height == 0:
        raise ImageReadError(f"{name}: image has zero size ({img.width}x{img.height})")
    _check_plausible(img, name)
    return img


MIN_SIDE = 16  # smaller is no radiograph: a 1x1 image once got "small right-sided pneumothorax"
MAX_ASPECT = 4.0  # radiographs are near square (0.7-1.4); the model sees a centre square crop


def _check_plausible(img: Image.Image, name: str) -> None:
    """Refuse what cannot be a chest X-ray (tiny, a strip); warn about one without contrast."""
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageReadError(f"{name}: image is {w}x{h}, too small to be a radiograph (at least {MIN_SIDE} px a side)")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ImageReadError(f"{name}: image is {w}x{h}, a strip (aspect ratio over {MAX_ASPECT:g}), not a radiograph")
    lo, hi = img.getextrema()
    if hi - lo < 8:
        log.warning("%s: almost no contrast (grey levels %d-%d): the output will mean little", name, lo, hi)


def _decode_pil(f: BinaryIO, name: str, size: int | None) -> Image.Image:
    try:
        with Image.open(f) as img:
            _check_pixels(name, img.width, img.height)  # from the header: nothing decoded yet
            if getattr(img, "n_frames", 1) > 1:
                log.warning("%s: %d frames (animated or multi-page); using the first", name, img.n_frames)
            if size and img.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= size:
                # several times faster for a 3000-pixel radiograph going to 512.
                img.draft("L", (size, size))
            img.load()  # decode everything now, so truncation is detected here
            img = ImageOps.exif_transpose(img)
            return to_grayscale(img)
    except UnidentifiedImageError as e:
        raise ImageReadError(
            f"{name}: not an image PIL can read and not a DICOM file (expected PNG, JPEG, "
            "TIFF, BMP or DICOM)"
        ) from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{name}: image is too large to decode safely ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncation as OSError("image file is truncated ...") and corrupt data
        # as OSError/SyntaxError/ValueError depending on the format plugin.
        raise ImageReadError(f"{name}: image is truncated or corrupt ({e}); re-export or re-download it") from e


def _decode_dicom(f: BinaryIO, name: str) -> Image.Image:
    _check_deflated(f, name)
    ds = _read_dicom_dataset(f, name)
    try:
        arr = _dicom_pixels(ds, name)
        return Image.fromarray(_dicom_to_uint8(arr, ds, name), mode="L")
    except ImageReadError:
        raise
    except Exception as e:  # a malformed header element surfaces here as any pydicom/numpy error
        raise ImageReadError(f"{name}: malformed DICOM ({type(e).__name__}: {e})") from e


_DEFLATED = "1.2.840.10008.1.2.1.99"


def _check_deflated(f: BinaryIO, name: str) -> None:
    """A deflated DICOM is inflated whole by pydicom: first make sure the inflated size is bounded.

    The bound is what a 16-bit image at the pixel limit needs, plus room for the header."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    start = f.tell()
    try:
        read_preamble(f, True)
        meta = _read_file_meta_info(f)
        deflated = str(meta.get("TransferSyntaxUID", "")) == _DEFLATED
    except Exception:  # noqa: BLE001 - no readable file meta: dcmread decides below, with its own errors
        deflated = False
    if deflated:
        bound = 2 * max_pixels() + 2**20
        got = len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(f.read(), bound + 1))
        if got > bound:
            raise ImageReadError(f"{name}: deflated DICOM inflates to over {bound / 2**20:.0f} MB, more than an "
                                 f"image within the pixel limit needs (set LLM_CXR_MAX_PIXELS to allow it)")
    f.seek(start)


def _read_dicom_dataset(f: BinaryIO, name: str):
    import pydicom

    try:
        # force=True also reads files written without the 128-byte preamble; whether the
        # result is a usable image is checked from its pixel data below.
        return pydicom.dcmread(f, force=True)
    except Exception as e:  # noqa: BLE001 - pydicom meets a damaged header with any of a dozen types (struct.error...)
        raise ImageReadError(f"{name}: unreadable DICOM file ({type(e).__name__}: {e})") from e


def _check_decoder(ds, name: str) -> None:
    from pydicom.pixels import get_decoder

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or not ts.is_compressed:
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise ImageReadError(f"{name}: DICOM transfer syntax {ts.name} ({ts}) is not supported by pydicom") from e
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise ImageReadError(
            f"{name}: DICOM pixel data is compressed as {ts.name} and no decoder for it is "
            f"installed ({missing}); {_PYLIBJPEG_HINT}"
        )


def _dicom_pixels(ds, name: str) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{name}: DICOM file has no pixel data (not an image object)")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    _check_pixels(name, int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0), frames)
    _check_decoder(ds, name)
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for malformed pixel data
        raise ImageReadError(f"{name}: cannot decode the DICOM pixel data ({type(e).__name__}: {e})") from e
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        warnings.warn(f"{name}: DICOM has {frames} frames; using the first", stacklevel=4)
        arr = arr[0]
    if samples > 1:  # colour DICOM (pydicom returns RGB): ITU-R 601 luma
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if arr.ndim != 2 or arr.size == 0:
        raise ImageReadError(f"{name}: DICOM pixel data has unusable shape {arr.shape}")
    return arr


def _dicom_to_uint8(arr: np.ndarray, ds, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    except Exception as e:
        raise ImageReadError(f"{name}: bad DICOM rescale / modality LUT ({type(e).__name__}: {e})") from e
    window = _window(ds, name)
    if window is not None:
        center, width = window
        # Linear VOI function of DICOM PS3.3 C.11.2.1.2.1.
        scaled = np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    else:
        if "VOILUTSequence" in ds:
            try:
                values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
            except Exception as e:
                log.warning("%s: ignoring unusable VOI LUT (%s)", name, e)
        scaled = _min_max(values)
    if str(getattr(ds, "PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


def _window(ds, name: str) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    # Multi-valued windows list alternatives (e.g. "standard", "bone"); the first is the default.
    center, width = _first(center), _first(width)
    try:
        center, width = float(center), float(width)
    except (TypeError, ValueError):
        log.warning("%s: ignoring unusable WindowCenter/WindowWidth %r/%r", name, center, width)
        return None
    if not np.isfinite(center) or not np.isfinite(width) or width < 1.0:
        log.warning("%s: ignoring invalid window (center %s, width %s)", name, center, width)
        return None
    return center, width


def _first(value):
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return value[0] if len(value) else None
    return value


def _min_max(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros_like(values)
    return np.clip((np.nan_to_num(values, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """High-bit-depth or float pixels to uint8.

    Values already within 0-255 (integers) or 0-1 (floats) keep their meaning; anything
    else is stretched from its own min-max range, so 12-bit data in a 16-bit container is
    neither black nor clipped.
    """
    values = arr.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(finite.min()), float(finite.max())
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        scaled = values
    elif lo >= 0.0 and hi <= 255.0:
        scaled = values / 255.0
    else:
        scaled = _min_max(values)
    return np.round(np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
