"""Fault-tolerant tar shard reading: URL resolution (paths, braces, `pipe:`) and samples that skip bad data.

Every problem is logged once as a warning and counted in a `Counter` under a reason:
`missing_shard`, `bad_shard` (unreadable, truncated or short tar; the samples before the damage are kept),
`duplicate_key`; the loader adds `undecodable`, `bad_shape` and `bad_label`.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import webdataset as wds
from webdataset.shardlists import expand_urls

logger = logging.getLogger(__name__)

SKIP_REASONS = ("missing_shard", "bad_shard", "duplicate_key", "undecodable", "bad_shape", "bad_label")


def is_remote(url: str) -> bool:
    """True for `pipe:` commands and scheme URLs (http://, s3://, ...), which are not checked on disk."""
    return url.startswith("pipe:") or "://" in url


def resolve_urls(data_dir: Path, names: str | Iterable[str]) -> list[str]:
    """Shard names (brace patterns, `::`-joined lists, relative or absolute paths, pipe:/scheme URLs) -> URLs.

    Relative paths are taken relative to data_dir.
    """
    patterns = [names] if isinstance(names, str) else list(names)
    urls = []
    for pattern in patterns:
        for url in expand_urls(str(pattern)):
            urls.append(url if is_remote(url) or os.path.isabs(url) else str(Path(data_dir) / url))
    return urls


def missing_local(urls: list[str]) -> list[str]:
    """The local (non-remote) URLs that are not files."""
    return [url for url in urls if not is_remote(url) and not os.path.isfile(url)]


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset naming: 'dir/key.ext.more' -> ('dir/key', 'ext.more')."""
    directory, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{directory}/{key}" if directory else key), ext


class EndMarked(tarfile.TarInfo):
    """Header reading that notes on its CheckedTar a header block of zeros: the end-of-archive marker."""

    @classmethod
    def fromtarfile(cls, tar: CheckedTar) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.ended = True
            raise


class CheckedTar(tarfile.TarFile):
    """A TarFile whose `ended` tells whether reading stopped at the end-of-archive marker.

    Python's tarfile also stops quietly at a short, empty or invalid header after the first one, which is how a
    tar cut short at (or inside) a header reads.
    """

    tarinfo = EndMarked
    ended = False


def count_damage(url: str, skipped: Counter, why: str) -> None:
    """Count a damaged shard as bad_shard, with a warning."""
    skipped["bad_shard"] += 1
    logger.warning("shard %s is damaged (%s); keeping the samples before the damage", url, why)


def iter_shard(url: str, skipped: Counter, expected: int | None = None) -> Iterator[dict]:
    """Samples {"__key__", "__url__", ext: bytes} of one tar, in order; a sample is emitted once complete: when the
    next sample's first header has been read, or at the end-of-archive marker.

    A missing or unreadable shard yields nothing. A damaged one (a member cut short, no end-of-archive marker, or
    fewer samples than `expected`, its count in the manifest) is counted once as bad_shard; it yields the samples
    before the damage, but not the one being read when the damage was met (it may lack fields).
    """
    try:
        stream = wds.gopen(url, "rb")
    except (OSError, ValueError) as e:
        skipped["missing_shard"] += 1
        logger.warning("skipping shard %s: cannot open it (%s)", url, e)
        return
    sample: dict = {}
    emitted = 0
    try:
        with stream, CheckedTar.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not ext:
                    continue
                # another key, or this key's field again: a new sample (a repeated key is iter_unique's to skip)
                if sample and (key != sample["__key__"] or ext in sample):
                    yield sample
                    emitted += 1
                    sample = {}
                data = tar.extractfile(member).read()
                if not sample:
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = data
            if not tar.ended:
                raise EOFError(f"no end-of-archive marker at byte {tar.offset}: cut short")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        count_damage(url, skipped, f"{type(e).__name__}: {e}")
        return
    if sample:
        yield sample
        emitted += 1
    if expected is not None and emitted < expected:
        count_damage(url, skipped, f"it holds {emitted} samples, the manifest records {expected}")


def iter_unique(urls: Iterable[str], skipped: Counter, counts: Mapping[str, int] | None = None) -> Iterator[dict]:
    """Samples of the shards in order, skipping (and counting) keys already seen in this pass.

    counts: samples per shard URL as the manifest records them; a shard holding fewer is counted as damaged.
    """
    counts = counts or {}
    seen: set[str] = set()
    for url in urls:
        for sample in iter_shard(url, skipped, counts.get(url)):
            if sample["__key__"] in seen:
                skipped["duplicate_key"] += 1
                logger.warning("skipping sample %r of %s: duplicate key", sample["__key__"], url)
                continue
            seen.add(sample["__key__"])
            yield sample
