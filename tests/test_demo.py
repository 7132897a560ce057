"""build_demo_images: real photos from wheels, deterministic, idempotent, one truncated JPEG."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline.demo import DEMO_CLASSES, build_demo_images


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo_images(str(out))


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except OSError:
        return False


def test_collection_layout(demo):
    out, count = demo
    images = sorted(p for p in out.glob("*/*") if p.suffix in (".jpg", ".png"))
    assert count == len(images)
    assert {p.parent.name for p in images} == set(DEMO_CLASSES) and len(DEMO_CLASSES) >= 6
    assert {p.suffix for p in images} == {".jpg", ".png"}
    assert all(p.name.count(".") == 1 for p in images)
    good = [p for p in images if _decodes(p)]
    assert len(good) >= 24
    assert [p.relative_to(out).as_posix() for p in images if p not in good] == [
        "food/coffee_truncated.jpg"
    ]
    modes = {Image.open(p).mode for p in good}
    assert {"L", "RGB"} <= modes
    assert (out / ".complete").exists()
    assert not list(out.rglob("*.tmp"))


def test_known_photos(demo):
    out, _ = demo
    with Image.open(out / "animals" / "chelsea.jpg") as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (451, 300), "RGB")
    with Image.open(out / "food" / "coffee.jpg") as im:
        assert (im.format, im.size) == ("JPEG", (600, 400))
    whole = (out / "food" / "coffee.jpg").read_bytes()
    assert (out / "food" / "coffee_truncated.jpg").read_bytes() == whole[: len(whole) // 2]


def test_second_build_is_a_no_op(demo):
    out, count = demo
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert build_demo_images(str(out)) == count
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_bytes_identical_across_builds(demo, tmp_path):
    out, count = demo
    assert build_demo_images(str(tmp_path / "again")) == count
    assert _files(tmp_path / "again") == _files(out)
