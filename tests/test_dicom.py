"""DICOM folders: msd_jax.data.dicom on pydicom's own sample files and on files written here, the
folder reader's float path, and an end-to-end run whose work directory must hold no tag value.

Expected pixels are computed here from the tags with the DICOM standard's formulas (PS3.3
C.11.1 modality LUT, C.11.2.1.2.1 linear window), in float64, not by calling the code under test.
Only the sample files inside pydicom's wheel are used: nothing is downloaded.
"""
import importlib.util
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from msd_jax import config as config_lib
from msd_jax.data import dicom
from msd_jax.data import sources
from msd_jax.data.errors import DataError
from test_cli import REPO, SMALL, ok

SAMPLES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Identifying tag values that must never reach a written file.
PATIENT_NAME, PATIENT_ID, INSTITUTION = "Zebulon^Quixote", "PID-8675309", "Xanadu Memorial Infirmary"
STUDY = "Wombat Elbow Protocol"
UID_ROOT = "1.2.826.0.1.3680043.8.498.777"


def sample(name):
    """A sample file shipped in pydicom's wheel (never get_testdata_file: it may download)."""
    path = os.path.join(SAMPLES, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} is not in this pydicom wheel")
    return path


def write_dicom(path, pixels, photometric="MONOCHROME2", uid=None, **tags):
    """Uncompressed Explicit VR Little Endian file; `pixels` [rows, cols] or [frames, rows, cols]
    of uint16 / int16, with identifying tags that must not leak."""
    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = uid or generate_uid(prefix=UID_ROOT + ".")
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.InstitutionName = PATIENT_NAME, PATIENT_ID, INSTITUTION
    ds.StudyDescription = STUDY
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


# The standard's formulas, written out independently.
def modality(stored, slope=1.0, intercept=0.0):
    return stored.astype(np.float64) * slope + intercept


def linear_window(x, c, w):
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    out = ((x - (c - 0.5)) / (w - 1) + 0.5)
    out[x <= lo] = 0.0
    out[x > hi] = 1.0
    return out


def min_max(x):
    return (x - x.min()) / (x.max() - x.min())


def ramp(shape=(12, 16), lo=0, hi=4000, dtype=np.uint16):
    return np.linspace(lo, hi, int(np.prod(shape))).reshape(shape).astype(dtype)


def only(images):
    assert len(images) == 1
    assert images[0].dtype == np.float32
    return images[0]


# --------------------------------------------------------------------------------------------
# Detection and options
# --------------------------------------------------------------------------------------------
def test_is_dicom_by_suffix_or_magic(tmp_path):
    marked = write_dicom(tmp_path / "IM0001", ramp())
    assert dicom.is_dicom(marked)
    assert dicom.is_dicom(str(tmp_path / "whatever.DCM"))
    png = tmp_path / "a.png"
    Image.new("L", (4, 4)).save(png)
    assert not dicom.is_dicom(str(png))


@pytest.mark.parametrize("key,value", [
    ("dicom_window", "soft"), ("dicom_window", "40"), ("dicom_window", "40,0"),
    ("dicom_window", "a,b"), ("dicom_frames", "first"),
])
def test_config_rejects_bad_dicom_options(key, value):
    c = config_lib.base_config()
    c.data[key] = value
    with pytest.raises(ValueError, match=f"config.data.{key}: expected"):
        config_lib.validate(c)


def test_config_accepts_dicom_options():
    c = config_lib.base_config()
    for window in ("auto", "none", "40,400", "-600,1500"):
        c.data.dicom_window = window
        c.data.dicom_frames = "all"
        config_lib.validate(c)


# --------------------------------------------------------------------------------------------
# Modality LUT, windowing, MONOCHROME1 (files written here)
# --------------------------------------------------------------------------------------------
def test_rescale_and_window_from_tags(tmp_path):
    stored = ramp(lo=-500, hi=3000, dtype=np.int16)
    path = write_dicom(tmp_path / "w.dcm", stored, RescaleSlope="2.5", RescaleIntercept="-1024",
                       WindowCenter=["300", "40"], WindowWidth=["1200", "80"])
    x = modality(stored, 2.5, -1024)
    got = only(dicom.read_dicom(path, "auto"))[..., 0]
    np.testing.assert_allclose(got, linear_window(x, 300, 1200), atol=1e-6)
    assert 0 < (got == 0).sum() and 0 < (got == 1).sum()  # the window clips both ends


def test_voi_lut_sequence_from_tags(tmp_path):
    stored = ramp((16, 16), lo=0, hi=255)
    lut = (20 + np.arange(256) ** 2 // 300).astype(np.uint16)  # 256 entries, 8 bits, 20..236
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = lut.astype("<u2").tobytes()
    path = write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[item],
                       WindowCenter="10", WindowWidth="20")  # the LUT wins over the window
    got = only(dicom.read_dicom(path, "auto"))[..., 0]
    np.testing.assert_allclose(got, lut[stored] / 255.0, atol=1e-6)


def test_window_given_in_config_and_none(tmp_path):
    stored = ramp(lo=0, hi=4095)
    path = write_dicom(tmp_path / "w.dcm", stored, RescaleSlope="1", RescaleIntercept="-1000",
                       WindowCenter="2000", WindowWidth="100")
    x = modality(stored, 1, -1000)
    np.testing.assert_allclose(only(dicom.read_dicom(path, "40,400"))[..., 0],
                               linear_window(x, 40, 400), atol=1e-6)
    np.testing.assert_allclose(only(dicom.read_dicom(path, "none"))[..., 0], min_max(x), atol=1e-6)


def test_no_window_in_file_is_min_max_in_float(tmp_path):
    # 12-bit range with fine steps: an 8-bit step on the way would show as coarse levels
    stored = ramp((20, 30), lo=1000, hi=1400)
    path = write_dicom(tmp_path / "m.dcm", stored)
    got = only(dicom.read_dicom(path, "auto"))[..., 0]
    np.testing.assert_allclose(got, min_max(modality(stored)), atol=1e-6)
    assert len(np.unique(got)) > 256


def test_monochrome1_is_inverted(tmp_path):
    stored = ramp(lo=0, hi=1000)
    path = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1",
                       WindowCenter="500", WindowWidth="600")
    got = only(dicom.read_dicom(path, "auto"))[..., 0]
    np.testing.assert_allclose(got, 1.0 - linear_window(modality(stored), 500, 600), atol=1e-6)
    assert got[0, 0] == 1.0 and got[-1, -1] == 0.0  # the lowest value is white


# --------------------------------------------------------------------------------------------
# pydicom's sample files
# --------------------------------------------------------------------------------------------
def test_ct_small_rescale_and_window():
    path = sample("CT_small.dcm")
    ds = pydicom.dcmread(path)
    x = modality(ds.pixel_array, float(ds.RescaleSlope), float(ds.RescaleIntercept))
    np.testing.assert_allclose(only(dicom.read_dicom(path, "40,400"))[..., 0],
                               linear_window(x, 40, 400), atol=1e-6)
    assert "WindowCenter" not in ds  # so 'auto' falls back to the min-max
    np.testing.assert_allclose(only(dicom.read_dicom(path, "auto"))[..., 0], min_max(x), atol=1e-6)


def test_mr_small_window_and_rle():
    path = sample("MR_small.dcm")
    ds = pydicom.dcmread(path)
    want = linear_window(ds.pixel_array.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth))
    got = only(dicom.read_dicom(path, "auto"))
    assert got.shape == (64, 64, 1)
    np.testing.assert_allclose(got[..., 0], want, atol=1e-6)
    np.testing.assert_array_equal(only(dicom.read_dicom(sample("MR_small_RLE.dcm"))), got)


def test_rgb_and_ybr_colour():
    path = sample("SC_rgb_small_odd.dcm")
    got = only(dicom.read_dicom(path))
    np.testing.assert_allclose(got, pydicom.dcmread(path).pixel_array / 255.0, atol=1e-6)
    path = sample("SC_ybr_full_422_uncompressed.dcm")
    raw = pixel_array(path, as_rgb=False)  # Y, Cb, Cr
    want = convert_color_space(raw, "YBR_FULL", "RGB") / 255.0
    got = only(dicom.read_dicom(path))
    assert got.shape == (100, 100, 3)
    np.testing.assert_allclose(got, want, atol=1.5 / 255)
    assert np.abs(got - raw / 255.0).max() > 0.1  # it was converted


def test_multi_frame_middle_and_all():
    path = sample("SC_rgb_rle_2frame.dcm")
    frames = pydicom.dcmread(path).pixel_array / 255.0
    np.testing.assert_allclose(only(dicom.read_dicom(path, frames="middle")), frames[1], atol=1e-6)
    every = dicom.read_dicom(path, frames="all")
    assert len(every) == 2
    for got, want in zip(every, frames):
        np.testing.assert_allclose(got, want, atol=1e-6)
    path = sample("rtdose.dcm")
    dose = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert dose.shape[0] == 15
    np.testing.assert_allclose(only(dicom.read_dicom(path))[..., 0], min_max(dose[7]), atol=1e-6)
    assert len(dicom.read_dicom(path, frames="all")) == 15


def test_written_multi_frame(tmp_path):
    stack = np.stack([np.full((8, 8), 100 * (i + 1), np.uint16) for i in range(3)])
    stack[:, 0, 0] = 0
    path = write_dicom(tmp_path / "mf.dcm", stack, WindowCenter="200", WindowWidth="401")
    got = dicom.read_dicom(path, frames="all")
    for frame, img in zip(stack, got):
        np.testing.assert_allclose(img[..., 0], linear_window(modality(frame), 200, 401), atol=1e-6)
    np.testing.assert_allclose(only(dicom.read_dicom(path))[..., 0], got[1][..., 0])


def _no_decoder(*modules):
    return not any(importlib.util.find_spec(m) for m in modules)


@pytest.mark.skipif(not _no_decoder("pylibjpeg", "jpeg_ls", "gdcm"), reason="a JPEG-LS decoder is installed")
def test_compressed_without_decoder_is_a_clear_error():
    path = sample("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(DataError) as e:
        dicom.read_dicom(path)
    msg = str(e.value)
    for part in (path, "JPEG-LS Lossless Image Compression", "1.2.840.10008.1.2.4.80",
                 "pip install pyjpegls"):
        assert part in msg


def test_non_image_object_is_named():
    path = sample("rtplan.dcm")
    with pytest.raises(DataError, match="no Pixel Data element"):
        dicom.read_dicom(path)


# --------------------------------------------------------------------------------------------
# The folder reader
# --------------------------------------------------------------------------------------------
def uniform(value, shape=(20, 24)):
    return np.full(shape, value, np.uint16)


def make_dicom_tree(root):
    """site/{bright,dark} + test, DICOM with and without suffix, duplicates, a DICOMDIR, a 16-bit
    PNG. Window 0..1000 (center 500.5, width 1000): stored value v -> v / 999 - 1/1998."""
    kw = dict(WindowCenter="500.5", WindowWidth="1000")
    site, test = root / "site", root / "test"
    dup = generate_uid(prefix=UID_ROOT + ".")
    write_dicom(site / "bright" / "s1" / "IM0001", uniform(800), **kw)
    write_dicom(site / "bright" / "s1" / "IM0002", uniform(800), uid=dup, **kw)
    write_dicom(site / "bright" / "s2" / "IM0002_copy.dcm", uniform(800), uid=dup, **kw)
    cross = generate_uid(prefix=UID_ROOT + ".")
    write_dicom(site / "bright" / "x.dcm", uniform(900), uid=cross, **kw)
    write_dicom(site / "dark" / "x.dcm", uniform(900), uid=cross, **kw)
    write_dicom(site / "dark" / "IM0003", uniform(200), **kw)
    Image.fromarray(uniform(1000)).save(site / "dark" / "deep.png")  # 16-bit PNG
    (site / "dark" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    write_dicom(test / "bright" / "t.dcm", uniform(700), **kw)
    write_dicom(test / "dark" / "t.dcm", uniform(100), **kw)
    return str(site), str(test)


def expected_level(stored, c=500.5, w=1000):
    y = linear_window(np.array([float(stored)]), c, w)[0]
    return np.round(y * 255) / 255


def test_folders_read_dicom_and_16_bit(tmp_path, caplog):
    site, test = make_dicom_tree(tmp_path)
    with caplog.at_level(logging.INFO, logger="msd_jax.data.sources"):
        (s,), t = sources.load_folders([site], test, 8, cache_dir=str(tmp_path / "cache"))
    # one of the two same-class copies kept; both cross-class copies dropped
    assert s.ids == ("bright/s1/IM0001", "bright/s1/IM0002", "dark/IM0003", "dark/deep.png")
    assert "duplicate_instances_dropped': 1" in caplog.text
    assert "cross_class_instances_dropped': 2" in caplog.text
    levels = s.images.reshape(len(s), -1)
    for row, want in zip(levels, [800, 800, 200]):
        np.testing.assert_allclose(row, expected_level(want), atol=1e-6)
    # a 16-bit PNG is scaled by its dtype's range, rounded once (1000/65535*255 = 3.89 -> 4)
    np.testing.assert_allclose(levels[3], 4 / 255, atol=1e-6)
    np.testing.assert_allclose(t.images.reshape(2, -1)[:, 0], [expected_level(700), expected_level(100)])
    for text in (PATIENT_NAME, PATIENT_ID, INSTITUTION, STUDY, UID_ROOT):
        assert text not in caplog.text


def test_folder_cache_keys_on_dicom_options(tmp_path):
    site, test = make_dicom_tree(tmp_path)
    cache = str(tmp_path / "cache")
    (auto,), _ = sources.load_folders([site], test, 8, cache_dir=cache)
    (wide,), _ = sources.load_folders([site], test, 8, cache_dir=cache,
                                      dicom_opts=sources.DicomOptions("0,4000"))
    assert abs(float(wide.images[0].mean()) - expected_level(800, 0, 4000)) < 1e-6
    assert not np.allclose(auto.images[0], wide.images[0])


def test_folders_all_frames(tmp_path):
    stack = np.stack([uniform(v, (16, 16)) for v in (0, 500, 1000)])
    write_dicom(tmp_path / "site" / "a" / "mf.dcm", stack)
    write_dicom(tmp_path / "site" / "b" / "one.dcm", ramp((16, 16)))
    write_dicom(tmp_path / "test" / "a" / "t.dcm", ramp((16, 16)))
    write_dicom(tmp_path / "test" / "b" / "t.dcm", ramp((16, 16)))
    sites = [str(tmp_path / "site")]
    (mid,), _ = sources.load_folders(sites, str(tmp_path / "test"), 8, cache_dir=str(tmp_path / "c"),
                                     dicom_opts=sources.DicomOptions("0,2001", "middle"))
    (every,), _ = sources.load_folders(sites, str(tmp_path / "test"), 8, cache_dir=str(tmp_path / "c"),
                                       dicom_opts=sources.DicomOptions("0,2001", "all"))
    assert mid.ids == ("a/mf.dcm", "b/one.dcm")
    assert every.ids == ("a/mf.dcm#frame0", "a/mf.dcm#frame1", "a/mf.dcm#frame2", "b/one.dcm")
    np.testing.assert_allclose(mid.images[0], every.images[1])
    assert list(every.labels) == [0, 0, 0, 1]


def test_folder_error_names_the_compressed_file(tmp_path):
    site, test = make_dicom_tree(tmp_path)
    bad = os.path.join(site, "dark", "compressed.dcm")
    with open(sample("MR_small_jpeg_ls_lossless.dcm"), "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read())
    if not _no_decoder("pylibjpeg", "jpeg_ls", "gdcm"):
        pytest.skip("a JPEG-LS decoder is installed")
    want = (r"compressed\.dcm: cannot decode pixel data of transfer syntax "
            r"JPEG-LS Lossless Image Compression \(1\.2\.840\.10008\.1\.2\.4\.80\)")
    with pytest.raises(DataError, match=want):
        sources.load_folders([site], test, 8, cache_dir=str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------
# End to end: no tag value in anything written
# --------------------------------------------------------------------------------------------
def make_hospital(folder, seed, n=6):
    rng = np.random.default_rng(seed)
    for cls, level in (("bright", 3000), ("dark", 800)):
        for i in range(n):
            px = np.clip(level + rng.normal(0, 300, (20, 20)), 0, 4095).astype(np.uint16)
            write_dicom(folder / cls / f"series{i % 2}" / f"IM{i:04d}", px, RescaleSlope="1",
                        RescaleIntercept="-1024", WindowCenter="1000", WindowWidth="4000")
    return str(folder)


def leaks(root, needles):
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            found += [(path, n) for n in needles if n in data]
    return found


def test_end_to_end_run_writes_no_tag_value(tmp_path):
    data = tmp_path / "pacs_export"
    sites = [make_hospital(data / name, i + 1) for i, name in enumerate(("hospital_a", "hospital_b"))]
    test = make_hospital(data / "test", 9)
    wd, cache = tmp_path / "wd", tmp_path / "tfds_cache"
    args = [sys.executable, "-m", "msd_jax.main", "--config", "configs/demo.py:quick",
            f"--workdir={wd}", "--mode=all", "--config.data.name=folders",
            f"--config.data.site_dirs={','.join(sites)}", f"--config.data.test_dir={test}",
            f"--config.data.cache_dir={cache}", *SMALL, "--config.train.num_steps=3"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    proc = ok(subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600))
    report_path = proc.stdout.strip().splitlines()[-1]
    with open(report_path) as f:
        report = json.load(f)
    assert report["data"]["class_names"] == ["bright", "dark"]
    assert sorted(s["num_images"] for s in report["sites"]) == [12, 12]
    assert report["data"]["num_test"] == 12
    needles = [t.encode() for t in (PATIENT_NAME, PATIENT_ID, INSTITUTION, STUDY, UID_ROOT)]
    needles += [b"Zebulon", b"Quixote", b"8675309"]
    assert leaks(str(wd), needles) == []
    assert leaks(str(cache), needles) == []
    assert os.listdir(cache)  # the prepared data was scanned too
    out = (proc.stdout + proc.stderr).encode()
    assert [n for n in needles if n in out] == []
    # ... and the scan does see a tag value where one is written (the originals)
    assert leaks(sites[0], needles[:1])
