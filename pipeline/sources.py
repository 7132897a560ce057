"""List an image collection and read its raw bytes, wherever it lives.

Every later stage (feature extraction, store writing, sampling) needs the same three
things about a collection: a stable sample key to address the stores with, a URL to fetch
the encoded image from, and a class label. Collections come as ImageFolder-style trees or
as webdataset tar shards (img2dataset layout), on local disk or any fsspec filesystem
(s3, memory, ...). This module hides those differences behind `list_source`, and
`read_items` fetches the bytes again, streaming each tar once instead of re-indexing it
for every member.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from braceexpand import braceexpand
from fsspec import AbstractFileSystem, get_filesystem_class
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.decode import ImageLimits, SkipSample
from storage_specs.provenance import redact_uri

IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "jfif"}
)
_TAR_PREFIX = "tar://"
# "tar://<member>::<tar url>": the tar URL is the last "::" link with a protocol, so a member
# named with "::" is still read (fsspec.open would read its name as a chain of filesystems).
_TAR_MEMBER = re.compile(r"^tar://(.*)::([a-z][a-z0-9+.-]*://.*)$", re.DOTALL)
_UNSAFE = re.compile(r"[^A-Za-z0-9/_-]")
# webdataset's rule: the key is everything up to the first dot of the basename.
_WDS_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_NO_IMAGES = "contains no images (.jpg, .png, ...)"
# Read failures that are the input's own fault (gone, a folder, not readable to us): read_items
# yields them, and the sample is skipped with the reason. Anything else (connection refused or
# reset, timeouts, throttling, 5xx, disk errors) is the storage's fault and is raised, so the job
# fails and its shard is redone by the next run instead of being committed with a good image
# recorded as unreadable.
_INPUT_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_TAR_INPUT_ERRORS = (*_INPUT_ERRORS, tarfile.TarError, EOFError)


@dataclass(frozen=True)
class SourceItem:
    key: str  # stable, unique sample key: no dots, '/' allowed
    uri: str  # fsspec URL of the raw bytes; "tar://<member>::<tar url>" for tar members
    label: int  # class index, -1 if unlabeled


@dataclass(frozen=True)
class Listing:
    items: list[SourceItem]  # sorted by key
    classes: list[str]  # sorted class names; index = label ([] for tar sources)
    ignored: list[str]  # non-image files (relative paths), tar samples without an image or a
    # readable label, duplicate tar members, unreadable tar tails


@dataclass
class _Sample:
    """One webdataset sample while a tar is being scanned."""

    key: str
    image: str | None = None  # member name
    cls: int | None = None
    meta_label: int | None = None


def list_source(url: str) -> Listing:
    """List the images of a folder, a `.tar` shard, a brace pattern of shards or a folder of
    shards. Raises ValueError with a one-line message when `url` holds no usable images."""
    tar_urls = _expand_pattern(url)
    if tar_urls is not None:
        return _list_tars(url, tar_urls)
    fs, root = _resolve(url)
    if fs.isdir(root):
        files = _visible_files(fs, root)
        if files and all(rel.lower().endswith(".tar") for rel in files):
            return _list_tars(url, [fs.unstrip_protocol(f"{root}/{rel}") for rel in files])
        return _list_folder(url, fs, root, files)
    if root.lower().endswith(".tar"):
        return _list_tars(url, [url])
    raise ValueError(f"source {url!r} is neither a folder nor .tar shards")


def read_items(
    uris: Sequence[str], max_bytes: int | None = ImageLimits.max_bytes
) -> Iterator[tuple[int, bytes | Exception]]:
    """Yield (position, bytes) for every uri in input order or (position, exception) when the
    input can't be read (missing, unreadable, a broken tar; a SkipSample for a file over
    `max_bytes`, which is never read whole: it could be larger than memory); storage failures
    (network, timeouts, server errors) are raised instead. Tar members are read by streaming
    each tar once (group consecutive members of the same tar), never by re-indexing the tar per
    member."""
    pos = 0
    while pos < len(uris):
        tar_url = _split_member(uris[pos])[1]
        if tar_url is None:
            yield pos, _read_file(uris[pos], max_bytes)
            pos += 1
            continue
        end = pos
        while end < len(uris) and _split_member(uris[end])[1] == tar_url:
            end += 1
        members = [_split_member(uri)[0] for uri in uris[pos:end]]
        for offset, value in _read_tar_members(tar_url, members, max_bytes):
            yield pos + offset, value
        pos = end


def _too_large(size: int, max_bytes: int) -> SkipSample:
    return SkipSample(f"file too large: {size} bytes > limit {max_bytes}")


# ---------------------------------------------------------------------------- keys


def _make_key(name: str) -> str:
    """Store-safe key: keep letters, digits, '/', '-' and '_'; everything else becomes '_'."""
    return _UNSAFE.sub("_", name)


def _unique_keys(bases: Sequence[str], exts: Sequence[str]) -> list[str]:
    """Deterministic disambiguation: colliding keys get `_<ext>`, then `_<n>` if still equal."""
    counts: dict[str, int] = {}
    for base in bases:
        counts[base] = counts.get(base, 0) + 1
    keys = [
        b if counts[b] == 1 else f"{b}_{_make_key(e.lower())}"
        for b, e in zip(bases, exts, strict=True)
    ]
    taken = set(bases) | set(keys)
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if key in seen:
            n = 2
            while f"{key}_{n}" in taken:
                n += 1
            keys[i] = f"{key}_{n}"
            taken.add(keys[i])
        seen.add(keys[i])
    return keys


def _strip_dot_slash(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


# ---------------------------------------------------------------------------- folders


def _resolve(url: str) -> tuple[AbstractFileSystem, str]:
    fs, path = url_to_fs(url)
    path = path.rstrip("/") or path
    if not fs.exists(path):
        raise ValueError(f"source {redact_uri(url)!r} does not exist")
    return fs, path


def _visible_files(fs: AbstractFileSystem, root: str) -> list[str]:
    """Sorted paths relative to `root`, skipping anything hidden ('.' components)."""
    prefix = root.rstrip("/") + "/"
    rels = (p[len(prefix) :] if p.startswith(prefix) else p for p in _find(fs, root))
    return sorted(r for r in rels if not any(part.startswith(".") for part in r.split("/")))


def _find(fs: AbstractFileSystem, root: str) -> list[str]:
    """Every file under `root`. On local disk, symlinked folders are followed, as torchvision's
    ImageFolder does (fsspec's find does not), a folder reached twice is listed once, and what is
    not a file (a named pipe would block its reader forever) is left out; a dangling link stays,
    to be recorded as unreadable."""
    if not isinstance(fs, LocalFileSystem):
        return fs.find(root)
    files, seen, todo = [], set(), [root]
    while todo:
        folder = todo.pop()
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or a second link to one folder
            continue
        seen.add(real)
        with os.scandir(folder) as entries:  # file types without a stat per file
            for entry in entries:
                if entry.is_dir():
                    todo.append(entry.path)
                elif entry.is_file() or entry.is_symlink():
                    files.append(entry.path)
    return files


def _image_ext(name: str) -> str | None:
    base = posixpath.basename(name)
    stem, dot, ext = base.rpartition(".")
    return ext if dot and stem and ext.lower() in IMAGE_EXTENSIONS else None


def _list_folder(url: str, fs: AbstractFileSystem, root: str, files: list[str]) -> Listing:
    images = [rel for rel in files if _image_ext(rel)]
    if not images:
        raise ValueError(f"source {url!r} {_NO_IMAGES}")
    classes = sorted({rel.split("/", 1)[0] for rel in images if "/" in rel})
    index = {name: i for i, name in enumerate(classes)}
    exts = [_image_ext(rel) or "" for rel in images]
    bases = [_make_key(rel[: -len(ext) - 1]) for rel, ext in zip(images, exts, strict=True)]
    items = [
        SourceItem(key, fs.unstrip_protocol(f"{root}/{rel}"), _folder_label(rel, index))
        for key, rel in zip(_unique_keys(bases, exts), images, strict=True)
    ]
    ignored = [rel for rel in files if not _image_ext(rel)]
    return Listing(sorted(items, key=lambda it: it.key), classes, ignored)


def _single_link(url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem and path of a file's URL, "::" in its name kept as part of the name
    (`url_to_fs` and `fsspec.open` read it as a chain of filesystems: another file's bytes)."""
    cls = get_filesystem_class(split_protocol(url)[0] or "file")
    return cls(**cls._get_kwargs_from_urls(url)), cls._strip_protocol(url)


def _folder_label(rel: str, index: dict[str, int]) -> int:
    return index[rel.split("/", 1)[0]] if "/" in rel else -1


# ---------------------------------------------------------------------------- tar shards


def _expand_pattern(url: str) -> list[str] | None:
    """Shard URLs of a brace pattern (`shards/{00000..00003}.tar`), None if not a pattern."""
    if "{" not in url or "}" not in url:
        return None
    urls = list(braceexpand(url))
    return None if urls == [url] else urls


def _list_tars(url: str, tar_urls: Sequence[str]) -> Listing:
    entries: list[tuple[str, str, str, int]] = []  # base key, image ext, member uri, label
    ignored: list[str] = []
    for tar_url in tar_urls:
        found, skipped = _tar_entries(url, tar_url)
        entries += found
        ignored += skipped
    if not entries:  # what was ignored says why (unreadable, no image members)
        raise ValueError(f"source {url!r} {_NO_IMAGES}" + "".join(f"; {i}" for i in ignored[:3]))
    keys = _unique_keys([e[0] for e in entries], [e[1] for e in entries])
    items = [SourceItem(k, e[2], e[3]) for k, e in zip(keys, entries, strict=True)]
    return Listing(sorted(items, key=lambda it: it.key), [], sorted(ignored))


def _tar_entries(url: str, tar_url: str) -> tuple[list[tuple[str, str, str, int]], list[str]]:
    """Image samples of one shard as (base key, ext, member uri, label), and the ignored ones."""
    if not tar_url.lower().endswith(".tar"):
        raise ValueError(f"source {url!r}: {tar_url!r} is not a .tar shard")
    fs, path = _resolve(tar_url)
    name = posixpath.basename(path)
    entries: list[tuple[str, str, str, int]] = []
    samples, ignored = _scan_tar(fs, path)
    images: set[str] = set()
    for sample in samples:
        if sample.image is None:
            ignored.append(f"{name}:{sample.key} (no image member)")
            continue
        if sample.image in images:  # a reader finds a member by name: only the first one
            ignored.append(f"{name}:{sample.image} (a second member of this name)")
            continue
        images.add(sample.image)
        base = _make_key(f"{name[: -len('.tar')]}/{_strip_dot_slash(sample.key)}")
        uri = f"{_TAR_PREFIX}{sample.image}::{fs.unstrip_protocol(path)}"
        entries.append((base, sample.image.rpartition(".")[2], uri, _sample_label(sample)))
    return entries, ignored


def _scan_tar(fs: AbstractFileSystem, path: str) -> tuple[list[_Sample], list[str]]:
    """Group the members of one tar into webdataset samples, in a single streaming pass; and
    what was ignored. A tar that breaks off (truncated, corrupt) keeps the samples before the
    break: one bad shard of many does not stop a run."""
    samples: list[_Sample] = []
    ignored: list[str] = []
    name = posixpath.basename(path)
    try:
        with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for member in tar:
                match = _WDS_MEMBER.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if not samples or samples[-1].key != key:
                    samples.append(_Sample(key))
                ignored += [f"{name}:{i}" for i in _add_member(samples[-1], tar, member, ext)]
    except _TAR_INPUT_ERRORS as exc:
        ignored.append(f"{name} (unreadable after {len(samples)} samples: cannot read tar: {exc})")
    return samples, ignored


def _add_member(
    sample: _Sample, tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str
) -> list[str]:
    """Add `member` to `sample`; returns what was ignored (a label that is not one)."""
    if ext in IMAGE_EXTENSIONS and sample.image is None:
        sample.image = member.name
    elif ext in ("cls", "json"):
        handle = tar.extractfile(member)
        data = handle.read(1 << 16) if handle is not None else b""  # a label is a few bytes
        if ext == "json":
            sample.meta_label = _json_label(data)
            return []
        try:
            sample.cls = int(data.decode("utf-8").strip())
        except ValueError:
            return [f"{member.name} (.cls is not an integer: {data[:32]!r}; unlabeled)"]
    return []


def _json_label(data: bytes) -> int | None:
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    for name in ("label", "cls"):
        value = meta.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _sample_label(sample: _Sample) -> int:
    if sample.cls is not None:
        return sample.cls
    return sample.meta_label if sample.meta_label is not None else -1


# ---------------------------------------------------------------------------- reading


def _split_member(uri: str) -> tuple[str, str | None]:
    """("member", "tar url") for `tar://member::tar-url`, else (uri, None)."""
    match = _TAR_MEMBER.match(uri)
    return (match.group(1), match.group(2)) if match else (uri, None)


def _read_file(uri: str, max_bytes: int | None = None) -> bytes | Exception:
    try:
        fs, path = _single_link(uri)
        with fs.open(path, "rb") as fh:
            data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            return _too_large(fs.size(path), max_bytes)
    except _INPUT_ERRORS as exc:
        return exc
    return data


def _read_tar_members(
    tar_url: str, members: Sequence[str], max_bytes: int | None = None
) -> Iterator[tuple[int, bytes | Exception]]:
    """Stream one tar, yielding (offset, bytes) in the order of `members` as soon as possible;
    members never found (or cut off by an error) yield an exception."""
    wanted: dict[str, list[int]] = {}
    for offset, name in enumerate(members):
        wanted.setdefault(name, []).append(offset)
    found: dict[int, bytes | Exception] = {}
    nxt = 0
    try:
        for name, data in _stream_tar(tar_url, set(wanted), max_bytes):
            for offset in wanted.pop(name):
                found[offset] = data
            while nxt in found:
                yield nxt, found.pop(nxt)
                nxt += 1
            if not wanted:
                break
    except _TAR_INPUT_ERRORS as exc:
        failure: Exception | None = exc
    else:
        failure = None
    for name, offsets in wanted.items():
        error = failure or FileNotFoundError(f"{name!r} not found in {tar_url!r}")
        found.update(dict.fromkeys(offsets, error))
    for offset in range(nxt, len(members)):
        yield offset, found[offset]


def _stream_tar(
    tar_url: str, names: Iterable[str], max_bytes: int | None = None
) -> Iterator[tuple[str, bytes | SkipSample]]:
    """(member name, bytes) for each wanted member, in tar order, first occurrence only; a
    SkipSample instead of the bytes of a member over `max_bytes`."""
    todo = set(names)
    fs, path = _single_link(tar_url)
    with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        for member in tar:
            if member.name not in todo or not member.isfile():
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            todo.discard(member.name)
            too_big = max_bytes is not None and member.size > max_bytes
            yield member.name, _too_large(member.size, max_bytes) if too_big else handle.read()
            if not todo:
                return
