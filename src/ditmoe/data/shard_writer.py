"""Writing samples into size- or count-bounded webdataset tar shards with per-shard counts and sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import webdataset as wds


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ShardSink:
    """Writes `<prefix>-000000.tar`, ... into out_dir, starting a new shard after max_count samples or once the tar
    holds max_bytes (its members with their headers, as written: a shard ends less than one sample past the limit,
    plus the end-of-archive blocks).

    `close()` returns one record per shard: {"name", "count", "bytes", "sha256"}.
    """

    def __init__(self, out_dir: Path, prefix: str, *, max_count: int | None = None, max_bytes: int | None = None):
        if max_count is not None and max_count < 1:
            raise ValueError(f"shard size must be >= 1 sample, got {max_count}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"shard bytes must be >= 1, got {max_bytes}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.records: list[dict] = []
        self.writer: wds.TarWriter | None = None
        self.count = 0

    def _finish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        path = self.out_dir / self.records[-1]["name"]
        self.records[-1].update(count=self.count, bytes=path.stat().st_size, sha256=file_sha256(path))
        self.writer = None

    def write(self, sample: dict) -> None:
        """Append one sample ({"__key__", ext: bytes/str, ...}), rotating shards at the limits."""
        if self.writer is None or self._full():
            self._finish()
            name = f"{self.prefix}-{len(self.records):06d}.tar"
            self.records.append({"name": name})
            self.writer = wds.TarWriter(str(self.out_dir / name))
            self.count = 0
        self.writer.write(sample)
        self.count += 1

    def _full(self) -> bool:
        """Whether the open shard holds max_count samples or max_bytes (the tar's bytes so far, PAX headers too)."""
        if self.max_count is not None and self.count >= self.max_count:
            return True
        return self.max_bytes is not None and self.count > 0 and self.writer.tarstream.offset >= self.max_bytes

    def close(self) -> list[dict]:
        """Close the open shard; the shard records in order."""
        self._finish()
        return self.records
