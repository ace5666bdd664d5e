"""edgepack.compress.size: the compressed size reported beside the raw size."""
from __future__ import annotations

import zipfile

import numpy as np

from edgepack.compress.size import (compressed_bytes, compressed_sizes, deflate_len, filtered_bytes, huffman_only_bytes,
                                   xz_bytes, zstd_bytes)


def test_compressed_bytes_is_the_size_of_the_zip_entry(tmp_path):
    rng = np.random.default_rng(0)
    # 3 MiB: crosses the 1 MiB streaming chunks; half noise, half a repeated pattern
    data = rng.integers(0, 256, 3 << 19, dtype=np.uint8).tobytes() + bytes(range(16)) * (3 << 15)
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    with zipfile.ZipFile(tmp_path / "a.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.write(path, "model.bin")
    with zipfile.ZipFile(tmp_path / "a.zip") as z:
        entry = z.getinfo("model.bin")
    assert compressed_bytes(path) == entry.compress_size
    assert deflate_len(data) == entry.compress_size
    assert len(data) // 2 < compressed_bytes(path) < len(data)  # the noise half does not compress


def test_compressed_sizes_record(tmp_path):
    path = tmp_path / "zeros.bin"
    path.write_bytes(bytes(100_000))
    sizes = compressed_sizes(path)
    assert sizes["raw_bytes"] == 100_000
    assert sizes["deflate_bytes"] < 200
    assert sizes["ratio"] == round(100_000 / sizes["deflate_bytes"], 3)
    assert sizes["deflate_huffman_bytes"] == huffman_only_bytes(path) > sizes["deflate_bytes"]  # zeros: matches win
    assert sizes["deflate_filtered_bytes"] == filtered_bytes(path) < 1000
    assert sizes["xz_bytes"] == xz_bytes(path) < 1000
    z = zstd_bytes(path)  # optional: None without the zstandard package
    assert sizes["zstd_bytes"] == z and (z is None or 0 < z < 200)


def test_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert compressed_bytes(path) == deflate_len(b"") > 0
    assert compressed_sizes(path)["raw_bytes"] == 0


def test_huffman_only_wins_on_4_bit_bytes(tmp_path):
    """What clustered int8 weights look like: 16 byte values, no repeats longer than chance."""
    rng = np.random.default_rng(1)
    path = tmp_path / "codes.bin"
    path.write_bytes(rng.integers(-8, 8, 200_000).astype(np.int8).tobytes())
    assert huffman_only_bytes(path) < compressed_bytes(path)
    assert huffman_only_bytes(path) < 0.52 * 200_000  # ~4 bits a byte


def test_filtered_and_xz_streams_decode_and_beat_zip_9_on_4_bit_bytes(tmp_path):
    """The secondary figures are real streams: zlib's raw inflate and lzma read them back."""
    import lzma
    import zlib
    rng = np.random.default_rng(2)
    p = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03, 0.02, 0.02])
    data = rng.choice(np.arange(-5, 5), 300_000, p=p / p.sum()).astype(np.int8).tobytes()
    path = tmp_path / "codes.bin"
    path.write_bytes(data)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_FILTERED)
    stream = c.compress(data) + c.flush()
    assert len(stream) == filtered_bytes(path) and zlib.decompress(stream, -zlib.MAX_WBITS) == data
    assert lzma.decompress(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) == data
    assert filtered_bytes(path) < compressed_bytes(path)
    assert xz_bytes(path) < compressed_bytes(path)
