"""Line numbers for dead letters: where in its file each rejected CSV row is.

A reader that starts mid-file (a split of a large CSV) knows a rejected row's byte offset but not
its line; `AddLineNumbers` finds it by counting newlines, reading only what it must.
`pipeline.transforms.WriteDeadLetters` runs it before writing the dead letters.
"""

from __future__ import annotations

import dataclasses
import logging

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

LINE_INDEX_BLOCK_BYTES = 16 << 20

_LOG = logging.getLogger(__name__)


class AddLineNumbers(beam.PTransform):
    """Fills in `line` for CSV dead letters that only know their byte `offset`.

    Those are rows read by a worker that started mid-file (`pipeline.sources.CsvLineBatches`). Their line is
    1 + the newlines before the offset: each file is cut into blocks of `block_size` bytes,
    every block before the last one holding such a row has its newlines counted (in parallel),
    and each block holding such rows is read once more up to its last one. This reads only
    files with such rows, at most once more each, and nothing when there are none. A file that
    cannot be read again (moved, compressed) leaves `line` empty; the offset stays exact.
    """

    def __init__(self, block_size: int = LINE_INDEX_BLOCK_BYTES):
        super().__init__()
        self.block_size = block_size

    def expand(self, letters):
        size = self.block_size
        known, unknown = letters | "NeedsLine" >> beam.Partition(
            lambda d, _: int(d.line is None and d.offset is not None and _seekable(d.source)), 2
        )
        by_block = unknown | "ByBlock" >> beam.Map(lambda d: ((d.source, d.offset // size), d))
        newlines_before = (
            by_block
            | "Blocks" >> beam.Keys()
            | "LastBlockPerFile" >> beam.CombinePerKey(max)
            | "BlocksBefore" >> beam.FlatMap(lambda fk: [(fk[0], k) for k in range(fk[1])])
            | "Spread" >> beam.Reshuffle()
            | "CountNewlines" >> beam.Map(lambda fk: (fk[0], (fk[1], _count_newlines(fk[0], fk[1] * size, size))))
            | "PerFile" >> beam.GroupByKey()
            | "PrefixSums" >> beam.MapTuple(lambda source, counts: (source, _prefix_sums(counts)))
        )
        found = (
            by_block
            | "GroupByBlock" >> beam.GroupByKey()
            | "Resolve" >> beam.FlatMap(_resolve_lines, size, beam.pvalue.AsDict(newlines_before))
        )
        return (known, found) | "All" >> beam.Flatten()


def _seekable(source: str) -> bool:
    return CompressionTypes.detect_compression_type(source) == CompressionTypes.UNCOMPRESSED


def _read_range(source: str, start: int, length: int) -> bytes | None:
    """`length` bytes of `source` from `start`, None (with a warning) if it cannot be read again."""
    try:
        with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.seek(start)
            return f.read(length)
    except OSError as e:
        _LOG.warning("dead letters of %s keep no line number: %s", source, e)
        return None


def _count_newlines(source: str, start: int, length: int) -> int | None:
    data = _read_range(source, start, length)
    return None if data is None else data.count(b"\n")


def _prefix_sums(counts) -> list[int | None]:
    """[(block, newlines)] -> newlines before each block (None from a block that could not be read on)."""
    per_block = dict(counts)
    sums, total = [0], 0
    for k in range(len(per_block)):
        n = per_block.get(k)
        total = None if total is None or n is None else total + n
        sums.append(total)
    return sums


def _resolve_lines(element, size: int, newlines_before: dict):
    (source, block), letters = element
    letters = sorted(letters, key=lambda d: d.offset)
    sums = newlines_before.get(source, [0])
    before = sums[block] if block < len(sums) else None
    start = block * size
    data = None if before is None else _read_range(source, start, letters[-1].offset - start)
    if data is None:
        yield from letters
        return
    line, position = 1 + before, 0
    for letter in letters:
        line += data.count(b"\n", position, letter.offset - start)
        position = letter.offset - start
        yield dataclasses.replace(letter, line=line)
