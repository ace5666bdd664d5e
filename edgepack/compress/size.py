"""The compressed size of an artifact: what it costs to ship (an OTA update, a download), which
is where weight clustering wins; raw bytes on the device do not change.

`compressed_bytes` is the reported figure: deflate at level 9, i.e. what a zip of the file
weighs (zlib's raw deflate stream, without the few dozen bytes of zip headers). It is in the
standard library, so every build reports it. `compressed_sizes` adds zstd (level 19) when the
`zstandard` package is installed; it is never required and never the reported figure, so
builds with and without it report the same number. It also gives deflate with Huffman coding
only (zlib's Z_HUFFMAN_ONLY, still a stream any unzip reads): on clustered int8 weights (bytes of
about 4 bits of entropy) zlib's level-9 matcher takes 3- and 4-byte matches that cost more than
the literals, so zip -9 lands ~0.4 bit per weight above what plain Huffman coding gives.
`filtered_bytes` is deflate level 9 with zlib's Z_FILTERED strategy (short matches dropped, long
ones kept: the protobuf text still compresses) and `xz_bytes` is the standard library's lzma
(xz preset 9e): both are secondary figures, given for plain and clustered artifacts alike.
Measured on a clustered ResNet-18 int8 file (bench/compress_cluster.py): per weight tensor,
Huffman-only and Z_FILTERED land within 2-3% of the codes' order-0 entropy, zip -9 15% above it.
"""
from __future__ import annotations

import lzma
import zlib
from pathlib import Path

DEFLATE_LEVEL = 9
ZSTD_LEVEL = 19
_CHUNK = 1 << 20


def compressed_bytes(path: Path | str) -> int:
    """Bytes of the file deflated at level 9 (the size of its entry in a zip), streamed in 1 MiB
    chunks so a large artifact is never held in memory twice."""
    deflate = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate, as zip stores it
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            total += len(deflate.compress(chunk))
    return total + len(deflate.flush())


def deflate_len(data: bytes) -> int:
    """Bytes of `data` deflated at level 9 (raw deflate, as zip stores it)."""
    deflate = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return len(deflate.compress(data)) + len(deflate.flush())


def _streamed_deflate_bytes(path: Path | str, strategy: int) -> int:
    deflate = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, 9, strategy)
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            total += len(deflate.compress(chunk))
    return total + len(deflate.flush())


def huffman_only_bytes(path: Path | str) -> int:
    """Bytes of the file as a deflate stream with Huffman coding only (no LZ77 matches)."""
    return _streamed_deflate_bytes(path, zlib.Z_HUFFMAN_ONLY)


def filtered_bytes(path: Path | str) -> int:
    """Bytes of the file deflated at level 9 with the Z_FILTERED strategy (still a zip-readable stream)."""
    return _streamed_deflate_bytes(path, zlib.Z_FILTERED)


def xz_bytes(path: Path | str) -> int:
    """Bytes of the file as an .xz stream (lzma preset 9 | extreme), streamed in 1 MiB chunks."""
    xz = lzma.LZMACompressor(preset=9 | lzma.PRESET_EXTREME)
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            total += len(xz.compress(chunk))
    return total + len(xz.flush())


def zstd_bytes(path: Path | str, level: int = ZSTD_LEVEL) -> int | None:
    """Bytes of the file compressed with zstd at `level`; None when `zstandard` is not installed."""
    try:
        import zstandard
    except ImportError:
        return None
    return len(zstandard.ZstdCompressor(level=level).compress(Path(path).read_bytes()))


def compressed_sizes(path: Path | str) -> dict:
    """Raw and compressed sizes of one file: {"raw_bytes", "deflate_bytes" (the reported one),
    "deflate_huffman_bytes", "deflate_filtered_bytes", "xz_bytes", "zstd_bytes" (None without
    zstandard), "ratio" (raw / deflate)}."""
    raw = Path(path).stat().st_size
    deflated = compressed_bytes(path)
    return {"raw_bytes": raw, "deflate_bytes": deflated, "deflate_huffman_bytes": huffman_only_bytes(path),
            "deflate_filtered_bytes": filtered_bytes(path), "xz_bytes": xz_bytes(path), "zstd_bytes": zstd_bytes(path),
            "ratio": round(raw / deflated, 3) if deflated else None}
