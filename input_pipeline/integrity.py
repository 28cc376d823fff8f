"""Names the damaged shard when TensorFlow reports a corrupted TFRecord.

tf.data's DataLossError says "corrupted record at 3060" but not in which file,
inside a 40-line traceback. `naming_corrupt_shards(patterns)` turns it into a
one-line `CorruptShardError` naming the shard, the record number and its byte
offset, found by reading each shard again (only after an error: no cost otherwise).

TFRecord framing: per record, uint64 length, uint32 CRC of the length, `length`
bytes of data, uint32 CRC of the data.
"""

import contextlib
import glob
import os
import re
import struct

import tensorflow as tf

_HEADER, _FOOTER = 12, 4


class CorruptShardError(ValueError):
    """A TFRecord shard that cannot be read to its end (bad CRC, truncated)."""


def record_offsets(path: str) -> list[int]:
    """Byte offset of each record header in a TFRecord file, as its framing says.

    Stops at the first header that is cut short or points past the end of the file.
    """
    offsets, pos, size = [], 0, os.path.getsize(path)
    with open(path, "rb") as f:
        while pos + _HEADER <= size:
            f.seek(pos)
            (length,) = struct.unpack("<Q", f.read(8))
            offsets.append(pos)
            pos += _HEADER + length + _FOOTER
    return offsets


def find_corrupt_record(path: str) -> str | None:
    """None when every record of `path` reads back; else where and why it fails."""
    n = 0
    try:
        for _ in tf.data.TFRecordDataset(path):
            n += 1
    except tf.errors.DataLossError as e:
        offsets = record_offsets(path)
        at = f"byte offset {offsets[n]}" if n < len(offsets) else "the end of the file"
        reason = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", e.message.splitlines()[0]).strip()
        return (f"record {n} at {at} of {os.path.getsize(path)} bytes ({reason}); "
                f"{n} records before it are readable")
    return None


def describe_corruption(patterns) -> str:
    """One line naming every corrupt shard matching the glob `patterns`."""
    found = []
    for path in sorted({f for p in patterns for f in glob.glob(p)}):
        problem = find_corrupt_record(path)
        if problem:
            found.append(f"{path}: {problem}")
    if not found:
        return f"a corrupted record in one of {list(patterns)}, not found when re-read"
    return "corrupt TFRecord shard " + "; ".join(found)


@contextlib.contextmanager
def naming_corrupt_shards(patterns):
    """Turns a DataLossError inside the block into CorruptShardError naming the shard."""
    try:
        yield
    except tf.errors.DataLossError:
        raise CorruptShardError(
            describe_corruption(patterns) + ". Re-run prepare into a new --out_dir, or "
            "restore the shard from a backup.") from None


def iterate_naming_corrupt_shards(dataset, patterns):
    """Iterates `dataset` under `naming_corrupt_shards(patterns)`."""
    with naming_corrupt_shards(patterns):
        yield from dataset
