"""Listing and reading image collections: folders, memory://, webdataset shards."""

from __future__ import annotations

import io
import os
import tarfile
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import webdataset as wds
from PIL import Image
from skimage import data

from pipeline.decode import SkipSample
from pipeline.sources import IMAGE_EXTENSIONS, Listing, SourceItem, list_source, read_items


def _encode(array, fmt: str) -> bytes:
    image = Image.fromarray(array)
    image.thumbnail((64, 64))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {
        "chelsea.jpg": _encode(data.chelsea(), "JPEG"),
        "coffee.jpg": _encode(data.coffee(), "JPEG"),
        "astronaut.png": _encode(data.astronaut(), "PNG"),
        "camera.png": _encode(data.camera(), "PNG"),
    }


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, payload in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    return root


def _write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def _read_all(uris: list[str]) -> list[bytes | Exception]:
    out = list(read_items(uris))
    assert [pos for pos, _ in out] == list(range(len(uris)))
    return [value for _, value in out]


def test_image_extensions_are_lowercase_without_dot() -> None:
    assert {"jpg", "jpeg", "png", "webp", "tif", "jfif"} <= IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and "." not in ext for ext in IMAGE_EXTENSIONS)


def test_image_folder_labels_keys_and_ignored(tmp_path: Path, photos: dict[str, bytes]) -> None:
    root = _write(
        tmp_path / "coll",
        {
            "dog/coffee.jpg": photos["coffee.jpg"],
            "cat/chelsea.JPG": photos["chelsea.jpg"],
            "cat/deep/camera.png": photos["camera.png"],
            "cat/notes.txt": b"not an image",
            "root-astronaut.png": photos["astronaut.png"],
            "README.md": b"# readme",
            ".hidden.jpg": photos["coffee.jpg"],
            "dog/.DS_Store": b"",
            ".cache/x.jpg": photos["coffee.jpg"],
            "empty-class/info.txt": b"no images here",
        },
    )
    listing = list_source(str(root))

    assert isinstance(listing, Listing)
    assert listing.classes == ["cat", "dog"]
    assert listing.items == [
        SourceItem("cat/chelsea", (root / "cat/chelsea.JPG").as_uri(), 0),
        SourceItem("cat/deep/camera", (root / "cat/deep/camera.png").as_uri(), 0),
        SourceItem("dog/coffee", (root / "dog/coffee.jpg").as_uri(), 1),
        SourceItem("root-astronaut", (root / "root-astronaut.png").as_uri(), -1),
    ]
    assert listing.ignored == ["README.md", "cat/notes.txt", "empty-class/info.txt"]
    assert list_source(root.as_uri()) == listing  # file:// and plain paths agree


def test_folder_reads_back_written_bytes(tmp_path: Path, photos: dict[str, bytes]) -> None:
    root = _write(tmp_path, {f"c/{name}": payload for name, payload in photos.items()})
    listing = list_source(str(root))
    by_key = {f"c/{Path(name).stem}": payload for name, payload in photos.items()}
    assert _read_all([it.uri for it in listing.items]) == [by_key[it.key] for it in listing.items]


def test_unlabeled_folder_dots_and_unsafe_characters(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    root = _write(
        tmp_path,
        {
            "img.v2.final.jpg": photos["chelsea.jpg"],
            "my photo (1).png": photos["camera.png"],
            "x.jpeg": photos["coffee.jpg"],
        },
    )
    listing = list_source(str(root))
    assert listing.classes == []
    assert [(it.key, it.label) for it in listing.items] == [
        ("img_v2_final", -1),
        ("my_photo__1_", -1),
        ("x", -1),
    ]
    assert all("." not in it.key for it in listing.items)


def test_key_collisions_are_disambiguated_deterministically(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    root = _write(
        tmp_path,
        {
            "a/x.jpg": photos["chelsea.jpg"],
            "a/x.png": photos["camera.png"],
            "a/y.png": photos["astronaut.png"],
            "b/p q.jpg": photos["coffee.jpg"],
            "b/p_q.jpg": photos["chelsea.jpg"],
        },
    )
    listing = list_source(str(root))
    keys = {it.key: Path(it.uri).name for it in listing.items}
    assert keys == {
        "a/x_jpg": "x.jpg",
        "a/x_png": "x.png",
        "a/y": "y.png",
        "b/p_q_jpg": "p q.jpg",
        "b/p_q_jpg_2": "p_q.jpg",
    }
    assert list_source(str(root)) == listing


@pytest.fixture
def memory_root() -> Iterator[str]:
    url = f"memory://featinv-test-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def test_memory_filesystem_folder(memory_root: str, photos: dict[str, bytes]) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe(
        {
            f"{memory_root}/cat/chelsea.jpg": photos["chelsea.jpg"],
            f"{memory_root}/cup/coffee.jpg": photos["coffee.jpg"],
            f"{memory_root}/cup/notes.txt": b"x",
        }
    )
    listing = list_source(memory_root)
    assert listing.classes == ["cat", "cup"]
    assert [(it.key, it.label) for it in listing.items] == [("cat/chelsea", 0), ("cup/coffee", 1)]
    assert all(it.uri.startswith("memory://") for it in listing.items)
    assert listing.ignored == ["cup/notes.txt"]
    assert _read_all([it.uri for it in listing.items]) == [
        photos["chelsea.jpg"],
        photos["coffee.jpg"],
    ]


def _shard_samples(photos: dict[str, bytes], prefix: str) -> list[dict]:
    return [
        {"__key__": f"{prefix}0", "jpg": photos["chelsea.jpg"], "cls": 3, "json": {"label": 9}},
        {"__key__": f"{prefix}1", "jpg": photos["coffee.jpg"], "json": {"label": 7, "url": "u"}},
        {"__key__": f"{prefix}2", "png": photos["camera.png"], "json": {"caption": "camera"}},
        {"__key__": f"{prefix}3", "txt": "caption without image", "cls": 1},
        {"__key__": f"sub.dir/{prefix}4", "png": photos["astronaut.png"], "cls": 5},
    ]


def test_webdataset_tar_listing(tmp_path: Path, photos: dict[str, bytes]) -> None:
    shard = _write_shard(tmp_path / "00000.tar", _shard_samples(photos, "s"))
    listing = list_source(str(shard))
    tar_url = shard.as_uri()
    assert listing.classes == []
    assert listing.items == [
        SourceItem("00000/s0", f"tar://s0.jpg::{tar_url}", 3),
        SourceItem("00000/s1", f"tar://s1.jpg::{tar_url}", 7),
        SourceItem("00000/s2", f"tar://s2.png::{tar_url}", -1),
        SourceItem("00000/sub_dir/s4", f"tar://sub.dir/s4.png::{tar_url}", 5),
    ]
    assert listing.ignored == ["00000.tar:s3 (no image member)"]
    # the member URIs are real fsspec URLs
    with fsspec.open(listing.items[0].uri, "rb") as fh:
        assert fh.read() == photos["chelsea.jpg"]


def test_tar_reads_back_written_bytes_with_duplicates(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    shard = _write_shard(tmp_path / "a.tar", _shard_samples(photos, "s"))
    uris = [it.uri for it in list_source(str(shard)).items]
    requested = [uris[2], uris[0], uris[2], uris[3]]
    assert _read_all(requested) == [
        photos["camera.png"],
        photos["chelsea.jpg"],
        photos["camera.png"],
        photos["astronaut.png"],
    ]


def test_brace_pattern_and_folder_of_shards(tmp_path: Path, photos: dict[str, bytes]) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "00000.tar", _shard_samples(photos, "a"))
    _write_shard(shards / "00001.tar", _shard_samples(photos, "b"))

    listing = list_source(f"{shards}/{{00000..00001}}.tar")
    assert [it.key for it in listing.items] == [
        "00000/a0",
        "00000/a1",
        "00000/a2",
        "00000/sub_dir/a4",
        "00001/b0",
        "00001/b1",
        "00001/b2",
        "00001/sub_dir/b4",
    ]
    assert listing.ignored == ["00000.tar:a3 (no image member)", "00001.tar:b3 (no image member)"]
    assert list_source(str(shards)) == listing
    assert list_source(shards.as_uri() + "/") == listing

    values = _read_all([it.uri for it in listing.items])
    assert values[3] == values[7] == photos["astronaut.png"]


def test_mixed_reads_put_errors_in_position(tmp_path: Path, photos: dict[str, bytes]) -> None:
    folder = _write(tmp_path / "f", {"c/chelsea.jpg": photos["chelsea.jpg"]})
    shard = _write_shard(tmp_path / "s.tar", _shard_samples(photos, "s"))
    file_uri = list_source(str(folder)).items[0].uri
    members = [it.uri for it in list_source(str(shard)).items]
    uris = [
        members[1],
        file_uri,
        (folder / "c/missing.jpg").as_uri(),
        members[0],
        f"tar://nope.jpg::{shard.as_uri()}",
        members[0],
        f"tar://x.jpg::{(tmp_path / 'gone.tar').as_uri()}",
        file_uri,
    ]
    values = _read_all(uris)
    assert values[0] == photos["coffee.jpg"]
    assert values[1] == values[7] == photos["chelsea.jpg"]
    assert isinstance(values[2], FileNotFoundError)
    assert values[3] == values[5] == photos["chelsea.jpg"]
    assert isinstance(values[4], FileNotFoundError)
    assert "nope.jpg" in str(values[4])
    assert isinstance(values[6], Exception)


def test_read_items_empty() -> None:
    assert list(read_items([])) == []


def test_bad_sources_raise_one_line_value_errors(tmp_path: Path, photos: dict[str, bytes]) -> None:
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "text", {"a/notes.txt": b"x", "b.csv": b"1,2"})
    _write(tmp_path / "single", {"chelsea.jpg": photos["chelsea.jpg"]})
    _write_shard(tmp_path / "blank.tar", [{"__key__": "k", "txt": "no image"}])
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar archive at all" * 40)
    cases = {
        str(tmp_path / "nope"): "does not exist",
        str(tmp_path / "empty"): "contains no images",
        str(tmp_path / "text"): "contains no images",
        str(tmp_path / "single/chelsea.jpg"): "neither a folder nor .tar",
        str(tmp_path / "blank.tar"): "contains no images",
        str(tmp_path / "broken.tar"): "cannot read tar",
        f"{tmp_path}/{{blank,missing}}.tar": "does not exist",
    }
    for url, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            list_source(url)
        assert "\n" not in str(info.value)
        assert url in str(info.value) or "missing.tar" in str(info.value)


def test_tar_listing_streams_once_from_non_seekable_file(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    """Tar bytes gzip-compressed: only a single forward pass is possible."""
    raw = _write_shard(tmp_path / "raw.tar", _shard_samples(photos, "s")).read_bytes()
    buf = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(raw)) as src,
        tarfile.open(fileobj=buf, mode="w:gz") as dst,
    ):
        for member in src:
            dst.addfile(member, src.extractfile(member))
    (tmp_path / "gz.tar").write_bytes(buf.getvalue())
    listing = list_source(str(tmp_path / "gz.tar"))
    assert [it.label for it in listing.items] == [3, 7, -1, 5]
    assert _read_all([it.uri for it in listing.items])[1] == photos["coffee.jpg"]


def test_a_file_over_the_limit_is_never_read_whole(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    """A misnamed video or disk image larger than memory must be a skip, not a MemoryError."""
    huge = tmp_path / "c/huge.jpg"
    huge.parent.mkdir()
    with open(huge, "wb") as fh:  # sparse: 256 MiB on paper, nothing on disk
        fh.truncate(256 * 2**20)
    shard = _write_shard(tmp_path / "s.tar", [{"__key__": "big", "jpg": b"\xff" * 5000}])
    uris = [huge.as_uri(), *(it.uri for it in list_source(str(shard)).items)]
    tracemalloc.start()
    values = [value for _, value in read_items(uris, max_bytes=1000)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20
    assert [str(v) for v in values] == [
        f"file too large: {256 * 2**20} bytes > limit 1000",
        "file too large: 5000 bytes > limit 1000",
    ]
    assert all(isinstance(v, SkipSample) for v in values)
    assert _read_all(uris[1:]) == [b"\xff" * 5000]  # no limit: read


def test_names_with_double_colons_read_their_own_bytes(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    """fsspec reads "::" in a URL as a chain of filesystems: `b::c.jpg` would open `b`."""
    root = _write(tmp_path / "f", {"c/b": photos["camera.png"], "c/b::c.jpg": photos["coffee.jpg"]})
    (item,) = list_source(str(root)).items
    assert item.key == "c/b__c" and _read_all([item.uri]) == [photos["coffee.jpg"]]
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("a::b.jpg", photos["chelsea.jpg"]), ("a", photos["camera.png"])):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (member,) = list_source(str(shard)).items
    assert _read_all([member.uri]) == [photos["chelsea.jpg"]]


def test_a_tar_member_name_given_twice_is_read_once(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    """A reader finds a member by name, so a second member of the same name would be read as the
    first one's bytes under its own key: it is ignored, and said so."""
    shard = _write_shard(
        tmp_path / "t.tar",
        [
            {"__key__": "dup", "jpg": photos["chelsea.jpg"]},
            {"__key__": "other", "jpg": photos["coffee.jpg"]},
            {"__key__": "dup", "jpg": photos["camera.png"]},
        ],
    )
    listing = list_source(str(shard))
    assert [it.key for it in listing.items] == ["t/dup", "t/other"]
    assert listing.ignored == ["t.tar:dup.jpg (a second member of this name)"]
    assert _read_all([it.uri for it in listing.items]) == [
        photos["chelsea.jpg"],
        photos["coffee.jpg"],
    ]


def test_a_broken_shard_does_not_stop_the_others(tmp_path: Path, photos: dict[str, bytes]) -> None:
    """A truncated shard keeps the samples before the break; a label that is not an integer
    leaves its image unlabeled; both are said in `ignored`."""
    shards = tmp_path / "shards"
    shards.mkdir()
    good = _write_shard(shards / "a.tar", [{"__key__": "x", "jpg": photos["chelsea.jpg"],
                                              "cls": b"dog"}])  # fmt: skip
    whole = _write_shard(tmp_path / "b.tar", _shard_samples(photos, "b")).read_bytes()
    (shards / "b.tar").write_bytes(whole[: len(whole) * 2 // 3])
    listing = list_source(str(shards))
    assert [(it.key, it.label) for it in listing.items][:2] == [("a/x", -1), ("b/b0", 3)]
    assert listing.ignored[0] == "a.tar:x.cls (.cls is not an integer: b'dog'; unlabeled)"
    (broken,) = (i for i in listing.ignored if i.startswith("b.tar (unreadable after "))
    assert "cannot read tar" in broken
    values = _read_all([it.uri for it in listing.items])
    assert values[:3] == [photos["chelsea.jpg"], photos["chelsea.jpg"], photos["coffee.jpg"]]
    assert isinstance(values[-1], Exception)  # the sample cut by the break: a recorded skip
    assert [it.key for it in list_source(str(good)).items] == ["a/x"]


def test_symlinked_class_folders_are_followed_once(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    """As torchvision's ImageFolder does; a link back up the tree does not loop; a named pipe is
    not a file."""
    elsewhere = _write(tmp_path / "elsewhere", {"d.jpg": photos["coffee.jpg"]})
    root = _write(tmp_path / "coll", {"cats/c.jpg": photos["chelsea.jpg"]})
    (root / "dogs").symlink_to(elsewhere, target_is_directory=True)
    (root / "cats/loop").symlink_to(root, target_is_directory=True)
    os.mkfifo(root / "cats/pipe.jpg")  # reading it would block forever
    listing = list_source(str(root))
    assert [(it.key, it.label) for it in listing.items] == [("cats/c", 0), ("dogs/d", 1)]
    assert _read_all([it.uri for it in listing.items]) == [
        photos["chelsea.jpg"],
        photos["coffee.jpg"],
    ]
