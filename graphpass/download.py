"""What a model costs to download: the size `zip -9` (deflate at level 9) stores of its files.

Deflate at level 9 runs at about 10 MB/s on float weights, so compressing a gigabyte model
whole took longer than the passes that rewrote it. Up to EXACT_UP_TO_BYTES the figure is
exact; above, it is estimated from a deterministic sample: SAMPLE_CHUNKS chunks of
SAMPLE_CHUNK_BYTES, evenly spaced over the files taken end to end, each deflated on its own,
the whole size scaled by the sample's ratio. Deflate looks back 32 KB only, so a chunk many
times that long compresses as it would inside the whole stream, and the error is the
sample's: on trained-looking float weights within a percent of the exact figure.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Real models up to this size (every figure in the README) get the exact figure.
EXACT_UP_TO_BYTES = 128 * 1000 * 1000
SAMPLE_CHUNKS = 32
SAMPLE_CHUNK_BYTES = 256 * 1024
LEVEL = 9


@dataclass(frozen=True)
class DownloadSize:
    """`zip_bytes` is exact when `sample_bytes` is None, else estimated from that many bytes."""

    zip_bytes: int
    sample_bytes: int | None = None

    @property
    def estimated(self) -> bool:
        return self.sample_bytes is not None

    def describe(self) -> str:
        if self.sample_bytes is None:
            return "exact"
        return f"estimated from a {self.sample_bytes / 1e6:.1f} MB sample"


def download_size(paths: Sequence[Path], *, exact_up_to: int | None = None,
                  chunks: int = SAMPLE_CHUNKS, chunk_bytes: int = SAMPLE_CHUNK_BYTES) -> DownloadSize:
    """The deflated size of `paths` taken end to end: exact up to `exact_up_to` bytes
    (EXACT_UP_TO_BYTES), else estimated from `chunks` evenly spaced chunks of `chunk_bytes`."""
    exact_up_to = EXACT_UP_TO_BYTES if exact_up_to is None else exact_up_to
    sizes = [path.stat().st_size for path in paths]
    total = sum(sizes)
    if total <= max(exact_up_to, chunks * chunk_bytes):
        return DownloadSize(deflated_bytes(file_chunks(paths)))
    sampled = compressed = 0
    for chunk in _sample_chunks(paths, sizes, chunks, chunk_bytes):
        sampled += len(chunk)
        compressed += deflated_bytes([chunk])
    return DownloadSize(round(total * compressed / sampled), sampled)


def bytes_download_size(data: bytes) -> DownloadSize:
    """A model held in memory (never written) is small: its exact figure."""
    return DownloadSize(deflated_bytes([data]))


def deflated_bytes(chunks: Iterable[bytes]) -> int:
    """The size of `chunks` after deflate at level 9, the compression `zip -9` stores."""
    compressor = zlib.compressobj(LEVEL)
    size = sum(len(compressor.compress(chunk)) for chunk in chunks)
    return size + len(compressor.flush())


def file_chunks(paths: Iterable[Path], chunk_bytes: int = 1 << 22) -> Iterator[bytes]:
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_bytes):
                yield chunk


def _sample_chunks(paths: Sequence[Path], sizes: Sequence[int], chunks: int, chunk_bytes: int) -> Iterator[bytes]:
    """`chunks` chunks of `chunk_bytes` at evenly spaced offsets of the files end to end, the
    first at the start and the last at the end (a chunk may span two files)."""
    total = sum(sizes)
    step = (total - chunk_bytes) / max(chunks - 1, 1)
    for index in range(chunks):
        yield _read_span(paths, sizes, int(index * step), chunk_bytes)


def _read_span(paths: Sequence[Path], sizes: Sequence[int], offset: int, length: int) -> bytes:
    parts = []
    for path, size in zip(paths, sizes):
        if offset >= size:
            offset -= size
            continue
        with open(path, "rb") as handle:
            handle.seek(offset)
            parts.append(handle.read(length))
        length -= len(parts[-1])
        offset = 0
        if length <= 0:
            break
    return b"".join(parts)
