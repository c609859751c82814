"""Image I/O: every supported format comes back as 8-bit grey with intensities the right way up."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from llm_cxr.data.images import is_dicom, load_image, read_image_bytes, to_grayscale, to_model_size
from llm_cxr.errors import ImageReadError

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "realcxr-dev"


def ramp(h: int = 24, w: int = 32, hi: int = 255) -> np.ndarray:
    """Left-to-right ramp 0..hi: left is dark, right is bright."""
    return np.tile(np.linspace(0, hi, w), (h, 1))


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    frames: int = 1,
    preamble: bool = True,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=preamble)
    return path


def mean_lr(img: Image.Image) -> tuple[float, float]:
    a = np.asarray(img, dtype=np.float64)
    half = a.shape[1] // 2
    return a[:, :half].mean(), a[:, half:].mean()


# ---- PNG / JPEG modes ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P"])
def test_8bit_modes_become_L_with_same_intensities(tmp_path, mode):
    grey = Image.fromarray(ramp().astype(np.uint8), "L")
    img = grey.convert(mode)
    if mode in ("RGBA", "LA"):
        img.putalpha(255)
    path = tmp_path / f"x_{mode}.png"
    img.save(path)
    out = load_image(path)
    assert out.mode == "L" and out.size == (32, 24)
    assert np.abs(np.asarray(out, np.int16) - np.asarray(grey, np.int16)).max() <= 2


@pytest.mark.parametrize("hi", [4095, 65535])
def test_16bit_png_uses_its_value_range(tmp_path, hi):
    path = tmp_path / "x16.png"
    Image.fromarray(ramp(hi=hi).astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    out = np.asarray(load_image(path))
    # Not black (divided by 65535) and not saturated (clipped at 255): the full ramp survives.
    assert out.min() == 0 and out.max() == 255
    assert 100 < out[:, 16].mean() < 160
    assert (np.diff(out[0].astype(int)) >= 0).all()


def test_int32_and_float_modes(tmp_path):
    as_int = Image.fromarray((ramp() * 100).astype(np.int32))
    assert as_int.mode == "I"
    assert np.asarray(to_grayscale(as_int)).max() == 255
    unit = Image.fromarray((ramp() / 255).astype(np.float32))
    assert unit.mode == "F"
    out = np.asarray(to_grayscale(unit))
    assert out[0, 0] == 0 and out[0, -1] == 255
    path = tmp_path / "f.tif"
    unit.save(path)
    assert np.asarray(load_image(path))[0, -1] == 255


def test_jpeg_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40), np.uint8)
    a[:, 20:] = 255  # bright right half of a landscape image
    img = Image.fromarray(a, "L").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # displayed portrait
    b = np.asarray(out, np.float64)
    assert b[30:, :].mean() > 200 and b[:10, :].mean() < 50  # bright half rotated to the bottom


def test_to_model_size_short_side_and_centre_crop():
    a = np.zeros((100, 200), np.uint8)
    a[:, 50:150] = 255  # the central square is white, the sides black
    out = to_model_size(Image.fromarray(a, "L"), 50)
    assert out.size == (50, 50) and out.mode == "L"
    assert np.asarray(out).mean() > 250  # the crop kept the centre
    assert to_model_size(Image.fromarray(a, "L"), 0).size == (200, 100)
    assert to_model_size(Image.new("RGB", (10, 30)), 40).size == (40, 40)
    with pytest.raises(ValueError):
        to_model_size(Image.new("L", (4, 4)), -1)


def test_load_image_size_and_no_file_name(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(ramp(300, 400).astype(np.uint8)).save(path)
    out = load_image(path, size=64)
    assert out.size == (64, 64) and out.mode == "L"
    left, right = mean_lr(out)
    assert left < right
    # A file name on the image would make `datasets` store the original path, not pixels.
    assert not getattr(load_image(path), "filename", "")


# ---- DICOM -------------------------------------------------------------------------------

def test_dicom_monochrome2_and_monochrome1(tmp_path):
    raw = ramp(hi=4095)
    m2 = load_image(make_dicom(tmp_path / "m2.dcm", raw, bits_stored=12))
    m1 = load_image(make_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1", bits_stored=12))
    assert m2.mode == m1.mode == "L" and m2.size == (32, 24)
    l2, r2 = mean_lr(m2)
    l1, r1 = mean_lr(m1)
    assert r2 > l2 + 100  # MONOCHROME2: high raw value = bright
    assert r1 < l1 - 100  # MONOCHROME1: high raw value = dark
    assert np.asarray(m2)[0, -1] == 255 and np.asarray(m1)[0, -1] == 0


def test_dicom_window_and_rescale(tmp_path):
    raw = ramp(hi=1000)
    # Stored 0..1000, slope 2 intercept -1000 -> -1000..1000; window 0 +- 100 is a narrow band.
    path = make_dicom(tmp_path / "w.dcm", raw, slope=2.0, intercept=-1000.0, window=(0.0, 200.0))
    a = np.asarray(load_image(path))
    real = raw * 2 - 1000
    assert (a[real < -110] == 0).all() and (a[real > 110] == 255).all()
    mid = (real > -90) & (real < 90)
    assert mid.any() and (a[mid] > 0).all() and (a[mid] < 255).all()
    # Without the window the full rescaled range is used.
    b = np.asarray(load_image(make_dicom(tmp_path / "nw.dcm", raw, slope=2.0, intercept=-1000.0)))
    assert b.min() == 0 and b.max() == 255 and 100 < b[:, 16].mean() < 160


def test_dicom_detected_by_magic_and_without_preamble(tmp_path):
    path = make_dicom(tmp_path / "m.dcm", ramp(hi=65535))
    renamed = tmp_path / "no_extension"
    path.rename(renamed)
    assert is_dicom(renamed, renamed.read_bytes()[:132])
    assert np.asarray(load_image(renamed))[0, -1] == 255
    bare = make_dicom(tmp_path / "bare.dcm", ramp(hi=300), preamble=False)
    assert np.asarray(load_image(bare))[0, -1] == 255
    data = (tmp_path / "bare.dcm").read_bytes()
    assert read_image_bytes(data, "upload.dcm", size=8).size == (8, 8)


def test_dicom_multiframe_first_frame_with_warning(tmp_path):
    frames = np.stack([ramp(hi=1000), ramp(hi=1000)[:, ::-1]])
    path = make_dicom(tmp_path / "mf.dcm", frames, frames=2)
    with pytest.warns(UserWarning, match="2 frames"):
        out = load_image(path)
    left, right = mean_lr(out)
    assert right > left  # the first frame, not the mirrored second


def test_dicom_errors(tmp_path):
    ds = pydicom.dcmread(make_dicom(tmp_path / "a.dcm", ramp(hi=100)))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(ImageReadError, match=r"nopix\.dcm.*no pixel data"):
        load_image(tmp_path / "nopix.dcm")

    ds = pydicom.dcmread(tmp_path / "a.dcm")
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jls.dcm")
    with pytest.raises(ImageReadError, match=r"jls\.dcm.*JPEG-LS.*decoder"):
        load_image(tmp_path / "jls.dcm")

    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01\x02garbage" * 5)
    with pytest.raises(ImageReadError, match=r"junk\.dcm"):
        load_image(tmp_path / "junk.dcm")


# ---- errors -------------------------------------------------------------------------------

def test_errors_name_the_file_and_problem(tmp_path):
    with pytest.raises(ImageReadError, match=r"missing\.png: file does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png: file is empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("this is not an image " * 20)
    with pytest.raises(ImageReadError, match=r"notes\.png: not an image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_detected(tmp_path, fmt):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=rf"cut\.{fmt.lower()}: image is truncated or corrupt"):
        load_image(path)
    with pytest.raises(ImageReadError, match="upload"):
        read_image_bytes(data[: len(data) // 2], f"upload.{fmt.lower()}")


# ---- real files ---------------------------------------------------------------------------

@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/realcxr-dev not available")
def test_real_images_all_load():
    paths = sorted((REAL / "images").iterdir())
    assert len(paths) == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no decompression-bomb or palette warnings either
        for p in paths:
            img = load_image(p, size=32)
            assert img.mode == "L" and img.size == (32, 32), p
            assert np.asarray(img).std() > 5, p  # a radiograph, not a blank
