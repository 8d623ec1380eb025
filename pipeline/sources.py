"""Beam sources of the raw logs: CSV in blocks of lines, Parquet by row group, both splittable.

`pipeline.transforms.ReadRawLogs` composes them; each yields `rows.RawRows` batches that know the
file and line (or byte offset) of every row, so dead letters can name them.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any

import pyarrow.parquet as pq
from apache_beam.io import filebasedsource
from apache_beam.io.filesystem import CompressionTypes

from pipeline import rows

CSV_BATCH_LINES = 8192
CSV_READ_BLOCK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 65536


class CsvLineBatches(filebasedsource.FileBasedSource):
    """CSV files -> `rows.RawRows` of up to CSV_BATCH_LINES lines, each line with its offset and line.

    Reads CSV_READ_BLOCK_BYTES at a time and cuts the block at line feeds with `bytes.split`,
    so no Python code runs per line. Lines are what Beam's `ReadFromText` yields: they end at a
    line feed, a carriage return just before it is dropped (CRLF files), a last line without
    one is kept, and a line belongs to the piece of the file in which its first byte lies (a
    piece that does not start the file begins after the first line feed at or after its start
    - 1), so the file splits across workers; compressed files are read whole.

    `offset` is the byte offset at which a line starts. `line` is its 1-based line number where
    the piece being read starts the file (the header is line 1), else None: a reader that starts
    mid-file cannot know how many lines precede it without reading them, and `WriteDeadLetters`
    fills those in for the rows it writes (`AddLineNumbers`). Checked against the file in
    tests/test_dead_letters.py.
    """

    def __init__(self, file_pattern: str, skip_header_lines: int, block_bytes: int = CSV_READ_BLOCK_BYTES):
        if skip_header_lines not in (0, 1):
            # A piece starting inside a longer header would not know to skip its later lines.
            raise ValueError(f"skip_header_lines must be 0 or 1, got {skip_header_lines}")
        super().__init__(file_pattern)  # compression: AUTO, from the file name
        self._skip_header_lines = skip_header_lines
        self._block_bytes = block_bytes

    def read_records(self, file_name, range_tracker):
        start = range_tracker.start_position() or 0
        with self.open_file(file_name) as f:
            if start:
                f.seek(start - 1)
                position, line = start - 1 + len(f.readline()), None
            else:
                position, line = 0, 1
                for _ in range(self._skip_header_lines):
                    skipped = f.readline()
                    position += len(skipped)
                    line += 1
            pending, started = b"", False
            while True:
                block = f.read(self._block_bytes)
                data = pending + block
                if block:
                    pieces = data.split(b"\n")
                    pending = pieces.pop()  # the start of a line the next block goes on with
                else:
                    pieces = [pending] if pending else []  # a last line without a line feed: as it is
                offsets = list(itertools.accumulate((len(p) + 1 for p in pieces), initial=position))
                position = offsets.pop()
                if block and b"\r" in data:
                    pieces = [p[:-1] if p.endswith(b"\r") else p for p in pieces]
                for i in range(0, len(pieces), CSV_BATCH_LINES):
                    batch = self._claim(range_tracker, offsets[i : i + CSV_BATCH_LINES], started)
                    if batch:
                        started = True
                        lines = [None] * len(batch) if line is None else range(line + i, line + i + len(batch))
                        yield rows.RawRows(file_name, pieces[i : i + len(batch)], lines, batch)
                    if len(batch) < len(offsets[i : i + CSV_BATCH_LINES]):
                        return  # the rest of the file is another piece's
                if not block:
                    return
                if line is not None:
                    line += len(pieces)

    @staticmethod
    def _claim(range_tracker, offsets: list[int], started: bool) -> list[int]:
        """The leading `offsets` that are this piece's: those before the range's stop, claimed
        by claiming the last of them (`started`: an earlier claim of this piece succeeded).

        A failed claim means the piece was split meanwhile, never at or below a position
        already claimed, so the offsets before the new stop are still this piece's. They are
        then marked as read (`set_current_position`) so that no later split can fall among
        them, and the stop is read once more for a split that came in between. Before any
        successful claim the tracker refuses every split, so there is nothing to mark.
        """
        n = bisect.bisect_left(offsets, range_tracker.stop_position())
        if n and not range_tracker.try_claim(offsets[n - 1]):
            n = bisect.bisect_left(offsets, range_tracker.stop_position())
            if n and started:
                range_tracker.set_current_position(offsets[n - 1])
                n = bisect.bisect_left(offsets, range_tracker.stop_position())
        return offsets[:n]

    def output_type_hint(self):
        return Any


class ParquetRowGroups(filebasedsource.FileBasedSource):
    """Parquet files -> `(file, row number of the first row, Table)` per row group.

    Splits like Beam's own Parquet source: a row group belongs to the piece of the file in which
    its first page starts. The row numbers come from the file's footer.
    """

    def __init__(self, file_pattern: str, columns: list[str]):
        super().__init__(file_pattern, compression_type=CompressionTypes.UNCOMPRESSED)
        self._columns = columns

    def read_records(self, file_name, range_tracker):
        with self.open_file(file_name) as f:
            parquet = pq.ParquetFile(f)
            meta = parquet.metadata
            first_row = 1
            start = range_tracker.start_position() or 0
            for i in range(meta.num_row_groups):
                group = meta.row_group(i)
                column = group.column(0)
                position = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
                if position >= start:
                    if not range_tracker.try_claim(position):
                        return
                    yield file_name, first_row, parquet.read_row_group(i, columns=self._columns)
                first_row += group.num_rows

    def output_type_hint(self):
        return Any


def parquet_raw_rows(element):
    """`(file, first row, Table)` -> `RawRows` of at most PARQUET_BATCH_ROWS rows."""
    source, first_row, table = element
    for batch in table.to_batches(max_chunksize=PARQUET_BATCH_ROWS):
        if batch.num_rows:
            yield rows.RawRows(source, batch, range(first_row, first_row + batch.num_rows))
            first_row += batch.num_rows
