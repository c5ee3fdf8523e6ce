"""data: specs, records, subsets, scikit-image samples, Imagenette lookup and (offline) download."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

import vitsift_core.data.sources as data
from conftest import DECODABLE, HOSTILE_SKIPPED, UNDECODABLE, write_hostile_images
from vitsift_core.data.sources import (
    IMAGENETTE_CLASSES,
    ImageRecord,
    download_imagenette,
    imagenette_root,
    read_record,
    resolve_images,
)
from vitsift_core.data.images import ImageDecodeError


# --------------------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------------------

def test_samples_all_load_offline():
    recs = resolve_images("samples")
    assert [r.id for r in recs] == [f"samples/{n}" for n in data.SAMPLE_NAMES]
    assert len({r.id for r in recs}) == len(recs) >= 15
    for r in recs:
        assert r.path is None
        a = read_record(r)
        assert a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8, r.id
        assert min(a.shape[:2]) >= 150, r.id  # real photos, not thumbnails
    assert {"samples/astronaut", "samples/chelsea", "samples/coffee"} <= {r.id for r in recs}


def test_samples_limit_and_unknown():
    assert [r.id for r in resolve_images("samples", limit=3)] == [
        f"samples/{n}" for n in data.SAMPLE_NAMES[:3]]
    with pytest.raises(ValueError, match="unknown scikit-image sample"):
        read_record(ImageRecord("samples/horse", None))


# --------------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------------

def test_folder_spec_on_fixture(bad_images_dir):
    recs = resolve_images(str(bad_images_dir))
    ids = [r.id for r in recs]
    assert ids == sorted(DECODABLE + UNDECODABLE)  # notes.txt ignored, bad .jpg files kept
    assert all(r.label is None and r.path == bad_images_dir / r.id for r in recs)
    for r in recs:
        if r.id in UNDECODABLE:
            with pytest.raises(ImageDecodeError):
                read_record(r)
        else:
            assert read_record(r).shape[2] == 3


def _make_tree(root: Path, layout: dict[str, int]) -> None:
    from PIL import Image

    for cls, n in layout.items():
        d = root / cls if cls else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(d / f"img{i:02d}.png")


def test_folder_recursive_case_insensitive_and_labels(tmp_path):
    _make_tree(tmp_path, {"b": 2, "a": 1, "": 1})
    (tmp_path / "a" / "deep").mkdir()
    (tmp_path / "a" / "deep" / "UPPER.JPG").write_bytes(b"x")   # image extension, any case
    (tmp_path / "a" / "x.Tiff").write_bytes(b"x")
    (tmp_path / "a" / "readme.md").write_text("no")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.png").write_bytes(b"x")
    (tmp_path / "b" / ".DS_Store.png").write_bytes(b"x")
    recs = resolve_images(str(tmp_path))
    assert [r.id for r in recs] == [
        "a/deep/UPPER.JPG", "a/img00.png", "a/x.Tiff", "b/img00.png", "b/img01.png", "img00.png"]
    assert [r.label for r in recs] == ["a", "a", "a", "b", "b", None]


@pytest.mark.timeout(60)
def test_hostile_folder_records(tmp_path):
    """Issue 15 case 4: a link loop (and a linked folder) is walked once per real folder, each real
    file gives one image; special files, bad links and .heic are records that say why, never opened."""
    d = write_hostile_images(tmp_path / "imgs")
    (d / "sub").mkdir()
    (d / "sub" / "c.png").write_bytes((d / "a.png").read_bytes())   # a copy: a file of its own
    (d / "sub" / "up").symlink_to("..")                              # a loop through a subfolder
    recs = resolve_images(str(d))
    assert [r.id for r in recs] == sorted(["a.png", "b.jpg", "sub/c.png", *HOSTILE_SKIPPED])
    assert {r.id: r.skip is None for r in recs} == {r.id: r.id in ("a.png", "b.jpg", "sub/c.png") for r in recs}
    for r in recs:
        if r.skip is not None:
            assert HOSTILE_SKIPPED[r.id] in r.skip, r.skip
            with pytest.raises(ImageDecodeError, match=HOSTILE_SKIPPED[r.id].replace(".", r"\.")):
                read_record(r)                                      # the FIFO would block here
    assert [r.id for r in resolve_images(str(d), limit=6)] == [     # before: 5 copies of a.png, b.jpg
        "a.png", "sub/c.png", "b.jpg", "broken.jpg", "photo.heic", "s.webp"]


def test_limit_round_robin_over_classes(tmp_path):
    _make_tree(tmp_path, {"c1": 5, "c2": 1, "c3": 3})
    recs = resolve_images(str(tmp_path), limit=5)
    assert [r.id for r in recs] == ["c1/img00.png", "c2/img00.png", "c3/img00.png",
                                    "c1/img01.png", "c3/img01.png"]
    # prefix property and determinism
    assert resolve_images(str(tmp_path), limit=3) == recs[:3]
    assert resolve_images(str(tmp_path), limit=100) == resolve_images(str(tmp_path), limit=100)
    assert len(resolve_images(str(tmp_path), limit=100)) == 9
    assert resolve_images(str(tmp_path), limit=0) == []


def test_unknown_specs(tmp_path):
    for spec in ["nonsense", str(tmp_path / "missing"), "imagenette:test", "imagenette"]:
        with pytest.raises(ValueError, match="samples.*imagenette:val.*folder"):
            resolve_images(spec)
    f = tmp_path / "f.png"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_images(str(f))


# --------------------------------------------------------------------------------------------------
# Imagenette: local copy
# --------------------------------------------------------------------------------------------------

def test_imagenette_missing_gives_helpful_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSIFT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as ei:
        resolve_images("imagenette:val")
    msg = str(ei.value)
    assert str(tmp_path / "imagenette2-160") in msg and "VITSIFT_DATA" in msg
    assert data.DOWNLOAD_COMMAND in msg


@pytest.mark.data
def test_imagenette_val_records(vitsift_data):
    root = imagenette_root()
    assert root == vitsift_data / "imagenette2-160"
    recs = resolve_images("imagenette:val")
    assert len(recs) == data.IMAGENETTE_COUNTS["val"]
    assert {r.label for r in recs} == set(IMAGENETTE_CLASSES)
    assert recs[0].id == "val/n01440764/ILSVRC2012_val_00009111.JPEG"  # relative to the root
    assert recs[0].path == root / recs[0].id
    sub = resolve_images("imagenette:val", limit=20)
    assert [r.label for r in sub[:10]] == sorted(IMAGENETTE_CLASSES)
    assert {r.label for r in sub[10:]} == set(IMAGENETTE_CLASSES)
    a = read_record(sub[0])
    assert a.dtype == np.uint8 and a.shape[2] == 3 and min(a.shape[:2]) == 160


@pytest.mark.data
def test_imagenette_grayscale_file_becomes_rgb(vitsift_data):
    from PIL import Image

    # first grayscale (mode L) val image: must come out as 3 equal channels
    for r in resolve_images("imagenette:val"):
        if Image.open(r.path).mode == "L":
            a = read_record(r)
            assert a.shape[2] == 3 and np.array_equal(a[..., 0], a[..., 2])
            break
    else:
        pytest.fail("expected grayscale images in Imagenette val")


# --------------------------------------------------------------------------------------------------
# Imagenette: download (no network: a tiny archive and a fake fetch)
# --------------------------------------------------------------------------------------------------

def _tiny_archive(extra: list[tuple[str, bytes]] = (), link: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    jpg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpg, format="JPEG")
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, payload):
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tar.addfile(ti, io.BytesIO(payload))

        for split in ("train", "val"):
            for wnid in IMAGENETTE_CLASSES:
                add(f"imagenette2-160/{split}/{wnid}/x_{split}.JPEG", jpg.getvalue())
        add("imagenette2-160/noisy_imagenette.csv", b"path,noisy_labels_0\n")
        for name, payload in extra:
            add(name, payload)
        if link:
            ti = tarfile.TarInfo("imagenette2-160/link")
            ti.type = tarfile.SYMTYPE
            ti.linkname = link
            tar.addfile(ti)
    return buf.getvalue()


@pytest.fixture
def fake_download(monkeypatch):
    """Serve a given archive instead of the network; returns a setter and counts fetches."""
    state = {"payload": _tiny_archive(), "calls": 0}

    def fetch(url, dest, progress=True):
        assert url == data.IMAGENETTE_URL
        state["calls"] += 1
        Path(dest).write_bytes(state["payload"])

    def use(payload: bytes):
        state["payload"] = payload
        monkeypatch.setattr(data, "IMAGENETTE_MD5", hashlib.md5(payload).hexdigest())

    monkeypatch.setattr(data, "_fetch", fetch)
    monkeypatch.setattr(data, "IMAGENETTE_COUNTS", {"train": 10, "val": 10})
    use(state["payload"])
    state["use"] = use
    return state


def test_download_extracts_and_verifies(tmp_path, fake_download, monkeypatch):
    root = download_imagenette(tmp_path)
    assert root == tmp_path / "imagenette2-160"
    assert len(list(root.rglob("*.JPEG"))) == 20
    assert fake_download["calls"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".imagenette-")]  # temp dir gone
    # second call: the existing copy is reused, nothing fetched
    assert download_imagenette(tmp_path) == root and fake_download["calls"] == 1
    # and resolve_images finds it through VITSIFT_DATA
    monkeypatch.setenv("VITSIFT_DATA", str(tmp_path))
    assert len(resolve_images("imagenette:train")) == 10
    assert imagenette_root(download=True) == root


def test_download_rejects_bad_checksum(tmp_path, fake_download, monkeypatch):
    monkeypatch.setattr(data, "IMAGENETTE_MD5", "0" * 32)
    with pytest.raises(ValueError, match="md5"):
        download_imagenette(tmp_path)
    assert not (tmp_path / "imagenette2-160").exists()
    assert not (tmp_path / "imagenette2-160.tgz").exists()  # never reused


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/evil_abs.txt", "imagenette2-160/../../evil.txt",
                                  "other_top/x.txt"])
def test_download_rejects_path_traversal(tmp_path, fake_download, evil):
    dest = tmp_path / "data"
    fake_download["use"](_tiny_archive(extra=[(evil, b"pwned")]))
    with pytest.raises(ValueError, match="unsafe|outside"):
        download_imagenette(dest)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "imagenette2-160").exists()
    assert not list(tmp_path.rglob("evil*"))


def test_download_rejects_links(tmp_path, fake_download):
    fake_download["use"](_tiny_archive(link="/etc/passwd"))
    with pytest.raises(ValueError, match="link"):
        download_imagenette(tmp_path)


def test_download_verifies_structure(tmp_path, fake_download, monkeypatch):
    monkeypatch.setattr(data, "IMAGENETTE_COUNTS", {"train": 9469, "val": 3925})
    with pytest.raises(ValueError, match="JPEGs, expected"):
        download_imagenette(tmp_path)
    assert not (tmp_path / "imagenette2-160").exists()  # nothing half-valid left behind


def test_fetch_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken(url, dest, progress=True):
        Path(dest).write_bytes(b"partial")
        raise ConnectionError("network down")

    monkeypatch.setattr(data, "_fetch", broken)
    with pytest.raises(ConnectionError):
        download_imagenette(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_classes():
    assert len(IMAGENETTE_CLASSES) == 10 and IMAGENETTE_CLASSES["n01440764"] == "tench"
    assert sum(data.IMAGENETTE_COUNTS.values()) == 13394
