"""Issue 6 figures: the Beam/tf.Transform preprocessing job against a single-process Arrow bound.

Not collected by pytest. Needs the flights extra (pip install -e ".[flights]"). Run from the
repository root:

    python tests/benchmarks/bench_preprocess.py prepare                  # inputs: flights x1, x3 as Parquet + CSV
    python tests/benchmarks/bench_preprocess.py check --scale 1 --format parquet   # same work? decoded outputs
    python tests/benchmarks/bench_preprocess.py bench --scales 1 3 --formats parquet csv --repeats 3
    python tests/benchmarks/bench_preprocess.py bench --scales 1 --formats parquet --repeats 1 --no-workers
    python tests/benchmarks/bench_preprocess.py profile --scale 1 --format parquet --top 40
    python tests/benchmarks/bench_preprocess.py compare OUT_BEFORE OUT_AFTER   # two runs' decoded outputs
    python tests/benchmarks/bench_preprocess.py all                      # prepare + bench (defaults, with its checks)

Every command takes `--work DIR` (default /tmp/embedpipe_bench_preprocess): inputs go to
DIR/input, outputs to DIR/out/<scale>x-<format>-<variant>, child logs to DIR/logs.

What runs:

* `reference` -- the bound: one Python process that does the flights config's work directly with
  pyarrow compute and tfx_bsl's RecordBatch -> tf.Example encoder: read (Parquet, or CSV as
  strings), validate like `pipeline.rows` (oversized field, bad int/float, missing value after
  `input.defaults`; the same first-reason rule), dead-letter JSON lines, the hash split
  (`pipeline.rows.eval_mask`, pure, reused), vocabularies on the train split with tf.Transform's
  rules (count >= min_count, tokens that are empty or hold \\n / \\r left out, ordered by
  (count, token bytes) descending -- `sorted(reverse=True)` in tf.Transform's
  VocabularyOrderAndWrite and `Top.Of` for top_k; OOV id = V + Fingerprint64 % oov_buckets),
  hash buckets (tf.strings.to_hash_bucket_fast over the whole column), the cross string
  (tf.strings.join of the parts, ints printed in decimal), identity ids with the OOV row,
  z-score with the train split's mean and population variance (tf.Transform: float32 mean/var,
  `(x - mean) / sqrt(var)` in float32, `x - mean` when var is 0), the label; then gzip TFRecords
  `train-00000-of-00001.tfrecord.gz` / `eval-...` (tf.io.TFRecordWriter, zlib's default level
  like the job's sink; encoded and written 65,536 rows at a time), the vocabulary files
  and id_counts.json.
  Reads run with use_threads=False (one core, like one Beam worker). `bucketize`, multiclass
  labels and crosses of float columns are not implemented (flights has none): it raises.
* `beam` -- `pipeline.preprocess.preprocess(config, out)` (FnApiRunner, in-process, 1 worker).
* `beam2` -- the same with `--direct_num_workers=2 --direct_running_mode=multi_processing`
  (FnApiRunner reads both options itself: it starts two worker processes and splits each
  stage's input between them; the workers import TensorFlow inside the timed work).
* `beam2t` -- with `--threads`: two workers as threads of one process (multi_threading).

Each run is a fresh subprocess (`_run`); the child times the work only (after its imports) and
reports ru_maxrss; the parent also samples the RSS summed over the child's process tree every
0.1 s (the multi_processing workers are grandchildren). rows/s = rows read / work seconds, the
same numerator for every variant. Each repetition runs the variants in a rotated order
(ABC, BCA, CAB, ...) so that drift on a shared machine hits all of them alike; the report gives
medians and the median of the per-repetition paired ratios. With two or more scales it also
gives each variant's throughput on the rows beyond the smallest input, (rows_large -
rows_small) / (t_large - t_small), and the fixed cost per run that this implies: a Beam run
pays several seconds whatever its size (pipeline construction, tf.Transform's tracing and
SavedModel writes, about a hundred fused stages, worker start-up), which dominates at 1M rows.

Flights x3 (1,010,328 rows): the 2013 rows three times, copy k re-dated to year 2013+k, i.e. its
day of week shifted by k days (2014 and 2015 start one and two weekdays later); everything
else is kept (same carriers, airports, fleet, schedule hours). Copies differ in `dow`, so each
row hashes to its split independently, the vocabularies keep the real key sets with
realistic counts (x3, spread over shifted days), and dow_x_hour sees more evenly spread
cells. The x3 Parquet and CSV are written exactly like `embedpipe example-data` writes x1
(`pipeline.synthetic.write_input_table`: Parquet row groups of 65,536 rows, and pyarrow.csv.write_csv).

The equality check decodes every record of both outputs (train and eval separately) with the
transformed feature spec and compares them as multisets of rows (the examples carry no row id;
identical decoded rows are interchangeable; the job's serialized Examples are not byte-stable
anyway: the encoder writes the feature map in a varying order), exactly for the int ids and
the label, and for the z-score counting bit-identical values, the largest difference in ulp
(at most MAX_ZSCORE_ULPS passes) and the mean/var behind it (the reference's against the
constants tf.Transform baked into transform_fn); plus the vocabulary files, id_counts.json, row
counts and dead letters per reason. `compare` runs the same check on any two output folders
(e.g. the job before and after a change; there both vocabularies come from transform_fn/assets).
`check` and `compare` exit 1 on a mismatch. The decoded feature spec is the flights config's.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

WORK = "/tmp/embedpipe_bench_preprocess"
DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
VARIANTS = {
    "reference": [],
    "beam": [],
    "beam2": ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    # Not run by default (--threads): two worker threads in one process (the GIL is released by
    # TensorFlow, tfx_bsl's encoder, Arrow and zlib, not by Beam's own per-element code).
    "beam2t": ["--direct_num_workers=2", "--direct_running_mode=multi_threading"],
}
RESULT_TAG = "BENCH_RESULT "
# tf.Transform computes mean/var per batch in float32 and merges the batches, so its variance
# can be an ulp or so off the reference's (float64, rounded once); z-scores then differ by a
# few ulp. Ints and labels must match exactly.
MAX_ZSCORE_ULPS = 4
ENCODE_ROWS = 65536  # the reference encodes and writes tf.Examples this many rows at a time


# ----------------------------------------------------------------------------------------------
# Inputs


def input_path(work: str, scale: int, fmt: str) -> str:
    return os.path.join(work, "input", f"flights_x{scale}.{fmt}")


def prepare(work: str, scales: list[int]) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline import datasets
    from pipeline.synthetic import write_input_table

    os.makedirs(os.path.join(work, "input"), exist_ok=True)
    base = datasets.flights_table()
    for scale in scales:
        copies = []
        for k in range(scale):
            t = base
            if k:
                day = pc.index_in(t.column("dow"), value_set=pa.array(DAYS)).to_numpy()
                shifted = pc.take(pa.array(DAYS, pa.string()), pa.array((day + k) % 7))
                t = t.set_column(
                    t.schema.get_field_index("dow"),
                    pa.field("dow", t.schema.field("dow").type),
                    shifted.cast(t.schema.field("dow").type),
                )
            copies.append(t)
        table = pa.concat_tables(copies)
        for fmt in ("parquet", "csv"):
            path = input_path(work, scale, fmt)
            if os.path.exists(path) and _rows_in(path) == table.num_rows and _row_groups_ok(path):
                print(f"{path}: exists ({table.num_rows} rows)")
                continue
            write_input_table(table, path)  # as `embedpipe example-data` writes x1
            print(f"{path}: {table.num_rows} rows, {os.path.getsize(path) / 1e6:.1f} MB")
    for scale in scales:
        meta = pq.ParquetFile(input_path(work, scale, "parquet")).metadata
        print(f"flights x{scale} parquet: {meta.num_rows} rows in {meta.num_row_groups} row group(s)")


def _row_groups_ok(path: str) -> bool:
    """False for a Parquet input written before example inputs had several row groups."""
    import pyarrow.parquet as pq

    from pipeline.synthetic import PARQUET_ROW_GROUP_ROWS

    if not path.endswith(".parquet"):
        return True
    meta = pq.ParquetFile(path).metadata
    return meta.num_rows <= PARQUET_ROW_GROUP_ROWS or meta.num_row_groups > 1


def _rows_in(path: str) -> int:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for _ in f) - 1


def flights_config(path: str, fmt: str):
    from schemas.loading import load_config

    config = load_config("flights")
    return dataclasses.replace(config, input=dataclasses.replace(config.input, path=path, format=fmt))


# ----------------------------------------------------------------------------------------------
# The reference: the same work in one process, pyarrow + tfx_bsl


_OVERSIZED, _BAD_INT, _BAD_FLOAT, _MISSING = 1, 2, 3, 4
_REASON_NAMES = {_OVERSIZED: "oversized_field", _BAD_INT: "bad_int", _BAD_FLOAT: "bad_float", _MISSING: "missing_value"}
_INT_PATTERN = r"^\s*[-+]?\d{1,18}(\.0*)?\s*$"
_FLOAT_PATTERN = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"


def reference(config, output_dir: str) -> dict:
    """Does the flights config's preprocessing in this process; returns the row counts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import tensorflow as tf
    from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

    from pipeline import rows as prows
    from schemas.config import LABEL_KEY

    out = os.path.join(output_dir, "preprocess")
    shutil.rmtree(out, ignore_errors=True)
    files = sorted(glob.glob(config.input.path))
    tables = [_read(config, f) for f in files]
    dead_counts: dict[str, int] = {}
    os.makedirs(os.path.join(out, "dead_letter"))
    good_parts = []
    with open(os.path.join(out, "dead_letter", "rejected-00000-of-00001.jsonl"), "w") as dead_file:
        for f, table in zip(files, tables):
            values, reason, where = _validate(config, table)
            for i in np.flatnonzero(reason):
                name = _REASON_NAMES[reason[i]]
                dead_counts[name] = dead_counts.get(name, 0) + 1
            _write_dead_letters(dead_file, config, f, table, reason, where)
            keep = pa.array(reason == 0)
            good_parts.append({c: v.filter(keep) for c, v in values.items()})
    good = {c: pa.concat_arrays([p[c] for p in good_parts]) for c in config.input.columns}
    n_good = len(good[config.raw_columns[0]])

    # The split: the job's own function (pure), on the canonical layout it expects.
    offsets = pa.array(np.arange(n_good + 1, dtype=np.int64))
    canonical = pa.RecordBatch.from_arrays(
        [pa.LargeListArray.from_arrays(offsets, good[c]) for c in config.input.columns],
        schema=prows.canonical_schema(config),
    )
    is_eval = prows.eval_mask(canonical, config)
    is_train = ~is_eval
    train_filter = pa.array(is_train)

    outputs: dict[str, np.ndarray] = {}
    vocab_dir = os.path.join(out, "transform", "vocabularies")
    os.makedirs(vocab_dir)
    for feature in config.categorical:
        if feature.is_cross:
            parts = [_as_string(good[c]) for c in feature.columns]
            x = pc.binary_join_element_wise(*parts, pa.scalar(feature.separator.encode(), pa.large_binary()))
        else:
            x = good[feature.columns[0]]
        if feature.type == "vocabulary":
            if not pa.types.is_large_binary(x.type):
                raise NotImplementedError("reference: vocabularies of non-string columns are not implemented")
            vocab = _vocabulary(x.filter(train_filter), feature.top_k, feature.min_count)
            with open(os.path.join(vocab_dir, feature.name), "wb") as f:
                f.write(b"".join(v + b"\n" for v in vocab))
            outputs[feature.name] = _apply_vocabulary(x, vocab, feature.oov_buckets)
        elif feature.type == "identity":
            ids = x.to_numpy()
            n = feature.num_buckets
            outputs[feature.name] = np.where((ids >= 0) & (ids < n), ids, n).astype(np.int64)
        else:
            strings = _as_string(x).to_numpy(zero_copy_only=False)
            outputs[feature.name] = tf.strings.to_hash_bucket_fast(strings, feature.hash_buckets).numpy()
    stats = {}
    for numeric in config.numeric:
        x = pc.cast(good[numeric.column], pa.float32()).to_numpy(zero_copy_only=False)
        if numeric.normalize == "zscore":
            # tf.Transform: float32 mean/var (population), z = (x - mean) / sqrt(var) in float32.
            train = x[is_train].astype(np.float64)
            mean = train.mean()
            var = np.mean((train - mean) ** 2)
            m32, s32 = np.float32(mean), np.sqrt(np.float32(var))
            stats[numeric.name] = {"mean": float(m32), "var": float(np.float32(var))}
            centred = x - m32
            x = centred / s32 if s32 != 0 else centred
        outputs[numeric.name] = x.astype(np.float32)
        if numeric.bucketize:
            raise NotImplementedError("reference: bucketize (tft.bucketize quantiles) is not implemented")
    task = config.label.task
    y = good[config.label.column]
    if task == "regression":
        outputs[LABEL_KEY] = pc.cast(y, pa.float32()).to_numpy(zero_copy_only=False)
    elif task == "binary":
        if config.label.positive is not None:
            outputs[LABEL_KEY] = (
                pc.equal(_as_string(y), pa.scalar(config.label.positive.encode(), pa.large_binary()))
                .to_numpy(zero_copy_only=False)
                .astype(np.int64)
            )
        else:
            outputs[LABEL_KEY] = (y.to_numpy(zero_copy_only=False) != 0).astype(np.int64)
    else:
        raise NotImplementedError("reference: multiclass labels are not implemented")

    # tf.Examples, one gzip TFRecord file per split; id_counts over the training split.
    encoder = RecordBatchToExamplesEncoder()
    counts = {}
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir)
    for split, mask in (("train", is_train), ("eval", is_eval)):
        arrays, names = [], []
        part_offsets = pa.array(np.arange(int(mask.sum()) + 1, dtype=np.int32))
        for name, values in outputs.items():
            arrays.append(pa.ListArray.from_arrays(part_offsets, pa.array(values[mask])))
            names.append(name)
        batch = pa.RecordBatch.from_arrays(arrays, names=names)
        with tf.io.TFRecordWriter(os.path.join(data_dir, f"{split}-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
            for start in range(
                0, batch.num_rows, ENCODE_ROWS
            ):  # slices: all serialized records at once would cost memory
                for record in encoder.encode(batch.slice(start, ENCODE_ROWS)):
                    writer.write(record)
        counts[split] = batch.num_rows
    id_counts = {}
    for table in config.tables:
        ids, n = np.unique(outputs[table][is_train], return_counts=True)
        id_counts[table] = {str(int(v)): int(c) for v, c in zip(ids, n)}
    with open(os.path.join(out, "id_counts.json"), "w") as f:
        f.write(json.dumps(id_counts, sort_keys=True) + "\n")
    with open(os.path.join(out, "transform", "zscore_stats.json"), "w") as f:
        json.dump(stats, f)
    read = sum(t.num_rows for t in tables)
    return {
        "read": read,
        "train": counts["train"],
        "eval": counts["eval"],
        "dead_letter": read - n_good,
        "dead_letter_by_reason": dict(sorted(dead_counts.items())),
    }


def _read(config, path: str):
    """One input file as a table of the configured columns (CSV: all strings, like the job)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    names = config.raw_columns
    if config.input.format == "parquet":
        return pq.read_table(path, columns=names, use_threads=False)
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(
            column_names=names, skip_rows=1 if config.input.header else 0, use_threads=False
        ),
        parse_options=pacsv.ParseOptions(delimiter=config.input.delimiter),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in names},
            null_values=list(config.input.null_values),
            strings_can_be_null=True,
        ),
    )


def _validate(config, table):
    """-> (typed column arrays, reason code per row (0 = good), column index of the reason)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    reason = np.zeros(n, np.int8)
    where = np.zeros(n, np.int16)
    columns = list(config.input.columns)

    def mark(mask, code, col):
        fresh = mask & (reason == 0)
        reason[fresh] = code
        where[fresh] = columns.index(col)

    cols = {}
    for col in columns:
        arr = table.column(col).combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        cols[col] = arr
        if (
            pa.types.is_string(arr.type)
            or pa.types.is_large_string(arr.type)
            or pa.types.is_binary(arr.type)
            or pa.types.is_large_binary(arr.type)
        ):
            mark(
                pc.fill_null(pc.greater(pc.binary_length(arr), config.input.max_field_bytes), False).to_numpy(
                    zero_copy_only=False
                ),
                _OVERSIZED,
                col,
            )
    values = {}
    for col, kind in config.input.columns.items():
        arr = cols[col]
        if pa.types.is_floating(arr.type):
            arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
        is_text = pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
        ok = None
        if kind == "string":
            arr = pc.cast(arr if is_text else pc.cast(arr, pa.string()), pa.large_binary())
        elif is_text:
            ok = pc.fill_null(pc.match_substring_regex(arr, _INT_PATTERN if kind == "int" else _FLOAT_PATTERN), True)
            arr = pc.utf8_trim_whitespace(pc.if_else(ok, arr, pa.scalar(None, arr.type)))
            if kind == "int":
                arr = pc.replace_substring_regex(arr, r"\.0*$", "")
            arr = pc.cast(arr, pa.int64() if kind == "int" else pa.float32())
        elif kind == "int" and pa.types.is_floating(arr.type):
            ok = pc.fill_null(pc.and_(pc.equal(pc.floor(arr), arr), pc.less_equal(pc.abs(arr), 2.0**53)), True)
            arr = pc.cast(pc.if_else(ok, arr, pa.scalar(None, arr.type)), pa.int64(), safe=False)
        else:
            arr = pc.cast(arr, pa.int64() if kind == "int" else pa.float32())
        if kind == "float":
            finite = pc.fill_null(pc.is_finite(arr), True)
            ok = finite if ok is None else pc.and_(ok, finite)
            arr = pc.if_else(ok, arr, pa.scalar(None, arr.type))
        bad = np.zeros(n, bool) if ok is None else ~ok.to_numpy(zero_copy_only=False)
        mark(bad, _BAD_INT if kind == "int" else _BAD_FLOAT, col)
        if col in config.input.defaults:
            arr = pc.fill_null(arr, pa.scalar(config.input.defaults[col]).cast(arr.type))
        mark(arr.is_null().to_numpy(zero_copy_only=False) & ~bad, _MISSING, col)
        values[col] = arr
    return values, reason, where


def _write_dead_letters(f, config, source: str, table, reason, where) -> None:
    import pyarrow as pa

    rejected = np.flatnonzero(reason)
    if not len(rejected):
        return
    first = 1 if config.input.format == "parquet" else (2 if config.input.header else 1)
    columns = list(config.input.columns)
    raw = table.take(pa.array(rejected)).to_pylist()
    for i, row in zip(rejected, raw):
        col = columns[where[i]]
        letter = {
            "reason": _REASON_NAMES[reason[i]],
            "detail": f"{_REASON_NAMES[reason[i]]} in column {col!r}",
            "source": source,
            "line": int(i) + first,
            "offset": None,
            "row": {k: (v if v == v else "nan") if isinstance(v, float) else v for k, v in row.items()},
        }
        f.write(json.dumps(letter, ensure_ascii=False, sort_keys=True, default=str) + "\n")


def _as_string(arr):
    """tf.strings.as_string for the cross parts: strings as they are, ints in decimal."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(arr.type):
        return pc.cast(pc.cast(arr, pa.string()), pa.large_binary())
    if pa.types.is_floating(arr.type):
        raise NotImplementedError("reference: tf.strings.as_string of floats ('%f' style) is not implemented")
    return pc.cast(arr, pa.large_binary())


def _vocabulary(train, top_k: int | None, min_count: int) -> list[bytes]:
    """tf.Transform's vocabulary: empty tokens and tokens with \\n or \\r left out, count >=
    min_count (when > 1), most frequent first, ties by token bytes descending, first top_k."""
    import pyarrow.compute as pc

    counted = pc.value_counts(train)
    tokens = counted.field("values").to_pylist()
    counts = counted.field("counts").to_pylist()
    pairs = [(c, t) for t, c in zip(tokens, counts) if t is not None and t and b"\n" not in t and b"\r" not in t]
    if min_count > 1:
        pairs = [(c, t) for c, t in pairs if c >= min_count]
    pairs.sort(reverse=True)
    return [t for _, t in (pairs[:top_k] if top_k else pairs)]


def _apply_vocabulary(x, vocab: list[bytes], oov_buckets: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc
    import tensorflow as tf

    ids = np.array(pc.fill_null(pc.index_in(x, value_set=pa.array(vocab, x.type)), -1).cast(pa.int64()))
    missing = ids < 0
    if missing.any() and oov_buckets:
        unknown = x.filter(pa.array(missing)).to_numpy(zero_copy_only=False)
        ids[missing] = len(vocab) + tf.strings.to_hash_bucket_fast(unknown, oov_buckets).numpy()
    return ids


# ----------------------------------------------------------------------------------------------
# One run in a fresh process


def child(variant: str, path: str, fmt: str, out: str) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    import tensorflow  # noqa: F401  (imports are timed apart from the work)
    import tfx_bsl.coders.example_coder  # noqa: F401

    from pipeline import rows  # noqa: F401  (the reference needs no Beam or tf.Transform)

    if variant != "reference":
        from pipeline import preprocess
    config = flights_config(path, fmt)
    imported = time.perf_counter()
    rss_imports = _tree_rss_mb(os.getpid())[0]
    if variant == "reference":
        counts = reference(config, out)
    else:
        counts = preprocess.preprocess(config, out, VARIANTS[variant])["rows"]
    done = time.perf_counter()
    print(
        RESULT_TAG
        + json.dumps(
            {
                "variant": variant,
                "rows": counts,
                "work_s": done - imported,
                "import_s": imported - started,
                "rss_after_imports_mb": rss_imports,
                "maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "maxrss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        ),
        flush=True,
    )


def _tree_rss_mb(pid: int) -> tuple[float, float]:
    """(sum, max) of VmRSS over `pid` and its descendants, in MiB."""
    total = largest = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0) / 1024
            total += rss
            largest = max(largest, rss)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total, largest


def run_child(work: str, variant: str, scale: int, fmt: str) -> dict:
    out = os.path.join(work, "out", f"{scale}x-{fmt}-{variant}")
    log = os.path.join(work, "logs", f"{scale}x-{fmt}-{variant}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, os.path.abspath(__file__), "_run", variant, input_path(work, scale, fmt), fmt, out]
    started = time.perf_counter()
    with open(log, "w") as logfile:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logfile, text=True, env=env)
        peak = {"sum": 0.0, "max": 0.0}

        def sample():
            while proc.poll() is None:
                total, largest = _tree_rss_mb(proc.pid)
                peak["sum"], peak["max"] = max(peak["sum"], total), max(peak["max"], largest)
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, _ = proc.communicate()
        sampler.join()
    wall = time.perf_counter() - started
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{variant} on {scale}x {fmt} failed (exit {proc.returncode}); log {log}:\n{tail}")
    result = json.loads(lines[-1][len(RESULT_TAG) :])
    result.update(
        scale=scale, format=fmt, out=out, wall_s=wall, tree_rss_peak_mb=peak["sum"], proc_rss_peak_mb=peak["max"]
    )
    result["rows_per_s"] = result["rows"]["read"] / result["work_s"]
    # ru_maxrss is exact for the child itself (sampling can miss a short peak); its children's
    # (multi_processing workers) come from RUSAGE_CHILDREN, the largest one.
    result["peak_rss_mb"] = max(result["maxrss_self_mb"], result["maxrss_children_mb"], peak["max"])
    return result


# ----------------------------------------------------------------------------------------------
# Measurement


def bench(
    work: str, scales: list[int], formats: list[str], repeats: int, variants: list[str], check: bool
) -> list[dict]:
    for scale in scales:
        for fmt in formats:
            if not os.path.exists(input_path(work, scale, fmt)):
                prepare(work, scales)
    results = []
    summary = []
    by_input = {}
    for scale in scales:
        for fmt in formats:
            runs = by_input[scale, fmt] = {v: [] for v in variants}
            for rep in range(repeats):
                order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
                for variant in order:
                    r = run_child(work, variant, scale, fmt)
                    runs[variant].append(r)
                    results.append(r)
                    print(
                        f"x{scale} {fmt:<7} rep {rep + 1} {variant:<9}: {r['rows_per_s']:>9,.0f} rows/s  work {r['work_s']:6.1f}s  "
                        f"(+{r['import_s']:.1f}s imports, wall {r['wall_s']:.1f}s)  peak RSS {r['peak_rss_mb']:,.0f} MiB "
                        f"(process tree {r['tree_rss_peak_mb']:,.0f}, after imports {r['rss_after_imports_mb']:,.0f})",
                        flush=True,
                    )
            summary.append(_summarise(scale, fmt, runs))
            if check and "reference" in runs:
                for variant in variants:
                    if variant != "reference":
                        compare_outputs(
                            runs["reference"][-1]["out"],
                            runs[variant][-1]["out"],
                            f"x{scale} {fmt}: reference vs {variant}",
                            runs["reference"][-1]["rows"],
                            runs[variant][-1]["rows"],
                        )
    for fmt in formats:
        if len(scales) > 1:
            summary.append(_summarise_marginal(fmt, by_input[min(scales), fmt], by_input[max(scales), fmt]))
    print("\nSummary (medians over the repetitions; 2-core machine shared with other work, so noisy):")
    for line in summary:
        print(line)
    with open(os.path.join(work, "bench_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def _summarise(scale: int, fmt: str, runs: dict) -> str:
    med = {v: statistics.median(r["rows_per_s"] for r in rs) for v, rs in runs.items() if rs}
    rss = {v: statistics.median(r["peak_rss_mb"] for r in rs) for v, rs in runs.items() if rs}
    tree = {v: statistics.median(r["tree_rss_peak_mb"] for r in rs) for v, rs in runs.items() if rs}
    n = next(iter(runs.values()))[0]["rows"]["read"]
    lines = [f"flights x{scale} {fmt} ({n:,} rows, {len(next(iter(runs.values())))} reps)"]
    for v in runs:
        lines.append(
            f"  {v:<9} {med[v]:>9,.0f} rows/s   peak RSS {rss[v]:>6,.0f} MiB (largest process, ru_maxrss)   "
            f"{tree[v]:>6,.0f} MiB (process tree, sampled)"
        )
    if "reference" in runs and "beam" in runs:
        paired = [b["rows_per_s"] / r["rows_per_s"] for b, r in zip(runs["beam"], runs["reference"])]
        lines.append(
            f"  beam / reference: {med['beam'] / med['reference']:.3f} (ratio of medians), "
            f"{statistics.median(paired):.3f} (median of paired ratios {', '.join(f'{p:.3f}' for p in paired)})"
        )
    if "beam2" in runs and "beam" in runs:
        paired = [b2["rows_per_s"] / b["rows_per_s"] for b2, b in zip(runs["beam2"], runs["beam"])]
        lines.append(
            f"  2 workers / 1 worker: {med['beam2'] / med['beam']:.3f} (ratio of medians), "
            f"{statistics.median(paired):.3f} (median of paired ratios {', '.join(f'{p:.3f}' for p in paired)})"
        )
    if "beam2" in runs and "reference" in runs:
        lines.append(f"  beam2 / reference: {med['beam2'] / med['reference']:.3f}")
    return "\n".join(lines)


def _summarise_marginal(fmt: str, small: dict, large: dict) -> str:
    """Throughput on the rows beyond the smaller input: (rows_large - rows_small) / (t_large -
    t_small) of the median work times, i.e. each variant's per-row speed with its fixed cost
    (pipeline construction, graph tracing, SavedModel writes, worker start-up) taken out; and
    that fixed cost, t_small - rows_small / marginal speed."""
    rows = {k: next(iter(runs.values()))[0]["rows"]["read"] for k, runs in (("small", small), ("large", large))}
    lines = [
        f"flights {fmt}: rows beyond the smaller input ({rows['large'] - rows['small']:,} rows), from the median work times"
    ]
    marginal = {}
    for v in small:
        t_small = statistics.median(r["work_s"] for r in small[v])
        t_large = statistics.median(r["work_s"] for r in large[v])
        if t_large <= t_small:
            lines.append(f"  {v:<9} no estimate (the larger input did not take longer)")
            continue
        marginal[v] = (rows["large"] - rows["small"]) / (t_large - t_small)
        fixed = t_small - rows["small"] / marginal[v]
        lines.append(f"  {v:<9} {marginal[v]:>9,.0f} rows/s on the extra rows; fixed cost about {fixed:4.1f} s a run")
    if "reference" in marginal and "beam" in marginal:
        lines.append(f"  beam / reference on the extra rows: {marginal['beam'] / marginal['reference']:.3f}")
    if "beam" in marginal:
        for v in ("beam2", "beam2t"):
            if v in marginal:
                lines.append(f"  {v} / beam on the extra rows: {marginal[v] / marginal['beam']:.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Equality of the outputs


def decode_split(out: str, split: str) -> dict[str, np.ndarray]:
    """Every record of `out/preprocess/data/<split>-*.tfrecord.gz`, decoded, column by column."""
    import tensorflow as tf

    spec = {
        "carrier": tf.int64,
        "origin": tf.int64,
        "dest": tf.int64,
        "tailnum": tf.int64,
        "month": tf.int64,
        "dow_x_hour": tf.int64,
        "distance": tf.float32,
        "label": tf.float32,
    }
    spec = {k: tf.io.FixedLenFeature([], t) for k, t in spec.items()}
    files = sorted(glob.glob(os.path.join(out, "preprocess", "data", f"{split}-*.tfrecord.gz")))
    ds = (
        tf.data.TFRecordDataset(files, compression_type="GZIP").batch(65536).map(lambda s: tf.io.parse_example(s, spec))
    )
    parts = [{k: v.numpy() for k, v in b.items()} for b in ds]
    return {k: np.concatenate([p[k] for p in parts]) if parts else np.array([]) for k in spec}


def _sorted_rows(cols: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    order = np.lexsort([cols[n] for n in reversed(names)])
    return {n: cols[n][order] for n in names}


def compare_outputs(
    ref_out: str, job_out: str, title: str, ref_rows: dict | None = None, job_rows: dict | None = None
) -> bool:
    """Prints where the decoded outputs of two runs differ; True when they hold the same rows."""
    print(f"\nEquality check, {title}:")
    ok = True
    if ref_rows is not None and job_rows is not None:
        keys = ("read", "train", "eval", "dead_letter", "dead_letter_by_reason")
        same = all(ref_rows.get(k) == job_rows.get(k) for k in keys)
        ok &= same
        print(f"  row counts: {'same' if same else 'DIFFERENT'}: reference {ref_rows} / job {job_rows}")
    # Vocabularies: the reference's files against tf.Transform's assets.
    for path in sorted(glob.glob(os.path.join(_vocab_dir(ref_out), "*"))):
        name = os.path.basename(path)
        theirs = os.path.join(_vocab_dir(job_out), name)
        with open(path, "rb") as f:
            a = f.read().split(b"\n")
        with open(theirs, "rb") as f:
            b = f.read().split(b"\n")
        a, b = [t for t in a if t], [t for t in b if t]
        if a == b:
            print(f"  vocabulary {name}: identical ({len(a)} tokens)")
        else:
            ok = False
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(
                f"  vocabulary {name}: DIFFERENT ({len(a)} vs {len(b)} tokens; first difference at row {first}: "
                f"{a[first : first + 3]} vs {b[first : first + 3]})"
            )
    with open(os.path.join(ref_out, "preprocess", "id_counts.json")) as f:
        ref_counts = json.load(f)
    with open(os.path.join(job_out, "preprocess", "id_counts.json")) as f:
        job_counts = json.load(f)
    same = ref_counts == job_counts
    ok &= same
    print(
        f"  id_counts.json: {'identical' if same else 'DIFFERENT'} ({', '.join(f'{k} {len(v)} ids' for k, v in sorted(job_counts.items()))})"
    )
    if not same:
        for table in sorted(set(ref_counts) | set(job_counts)):
            if ref_counts.get(table) != job_counts.get(table):
                a, b = ref_counts.get(table, {}), job_counts.get(table, {})
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[:5]
                print(f"    {table}: e.g. " + ", ".join(f"id {k}: {a.get(k)} vs {b.get(k)}" for k in diff))
    if os.path.exists(os.path.join(ref_out, "preprocess", "transform", "zscore_stats.json")):
        _compare_zscore_stats(ref_out, job_out)
    ints = ["carrier", "origin", "dest", "tailnum", "month", "dow_x_hour", "label"]
    bit_identical = ok
    for split in ("train", "eval"):
        a, b = decode_split(ref_out, split), decode_split(job_out, split)
        n_a, n_b = len(a["label"]), len(b["label"])
        if n_a != n_b:
            ok = False
            print(f"  {split}: DIFFERENT row counts {n_a} vs {n_b}")
        # Sort both by every column; z-scores are a monotone function of the raw value under
        # either run's mean/std, so an off-by-an-ulp mean still sorts the rows the same way.
        names = ints + ["distance"]
        a, b = _sorted_rows(a, names), _sorted_rows(b, names)
        if n_a == n_b:
            bad_cols = [
                c
                for c in ints
                if not np.array_equal(
                    a[c].view(np.int32) if a[c].dtype == np.float32 else a[c],
                    b[c].view(np.int32) if b[c].dtype == np.float32 else b[c],
                )
            ]
            za, zb = a["distance"], b["distance"]
            exact = int(np.sum(za.view(np.int32) == zb.view(np.int32)))
            maxdiff = float(np.max(np.abs(za.astype(np.float64) - zb))) if n_a else 0.0
            ulps = int(np.max(np.abs(za.view(np.int32).astype(np.int64) - zb.view(np.int32)))) if n_a else 0
            ok &= not bad_cols and ulps <= MAX_ZSCORE_ULPS
            bit_identical &= not bad_cols and exact == n_a
            print(
                f"  {split}: {n_a:,} rows decoded from each; int ids and label: "
                f"{'identical' if not bad_cols else 'DIFFERENT in ' + ', '.join(bad_cols)}; distance (z-score): "
                f"{exact:,}/{n_a:,} bit-identical, max |diff| {maxdiff:.3g} ({ulps} ulp)"
            )
        else:
            bad_cols = ints
        if bad_cols:
            from collections import Counter

            ka = Counter(zip(*(a[c].tolist() for c in ints)))
            kb = Counter(zip(*(b[c].tolist() for c in ints)))
            only_a, only_b = ka - kb, kb - ka
            print(
                f"    rows (ints + label) only in the reference: {sum(only_a.values())}, e.g. {list(only_a.items())[:3]}"
            )
            print(
                f"    rows (ints + label) only in the job:       {sum(only_b.values())}, e.g. {list(only_b.items())[:3]}"
            )
            print(f"    columns: {ints}")
    if ok and bit_identical:
        print("  => SAME WORK: the decoded outputs are identical")
    elif ok:
        print(f"  => SAME WORK: identical but for z-scores within {MAX_ZSCORE_ULPS} ulp (the float32 mean/var above)")
    else:
        print("  => MISMATCH (see above)")
    return ok


def _vocab_dir(out: str) -> str:
    """The reference's vocabulary folder, or tf.Transform's assets (vocabularies named after their feature)."""
    ours = os.path.join(out, "preprocess", "transform", "vocabularies")
    return ours if os.path.isdir(ours) else os.path.join(out, "preprocess", "transform", "transform_fn", "assets")


def _compare_zscore_stats(ref_out: str, job_out: str) -> None:
    """The reference's z-score mean/var against the scalar float constants of the job's graph
    (tf.Transform bakes analyzer results into transform_fn as constants)."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import tensor_util

    with open(os.path.join(ref_out, "preprocess", "transform", "zscore_stats.json")) as f:
        stats = json.load(f)
    model = saved_model_pb2.SavedModel()
    with open(os.path.join(job_out, "preprocess", "transform", "transform_fn", "saved_model.pb"), "rb") as f:
        model.ParseFromString(f.read())
    graph = model.meta_graphs[0].graph_def
    consts = []
    for node in list(graph.node) + [n for fn in graph.library.function for n in fn.node_def]:
        if node.op == "Const" and node.attr["dtype"].type == 1 and not node.attr["value"].tensor.tensor_shape.dim:
            value = np.float32(tensor_util.MakeNdarray(node.attr["value"].tensor))
            if value != 0:
                consts.append(value)
    for name, s in stats.items():
        found = []
        for key in ("mean", "var"):
            ours = np.float32(s[key])
            near = min(consts, key=lambda c: abs(int(c.view(np.int32)) - int(ours.view(np.int32))), default=None)
            ulp = None if near is None else abs(int(near.view(np.int32)) - int(ours.view(np.int32)))
            found.append(
                f"{key} {ours!r} vs {near!r} ({ulp} ulp)"
                if ulp is not None and ulp <= 16
                else f"{key} {ours!r} vs not found"
            )
        print(
            f"  z-score {name}: reference (float64 over the train split, rounded) vs job graph constant: {'; '.join(found)}"
        )


def check(work: str, scale: int, fmt: str) -> bool:
    ref = run_child(work, "reference", scale, fmt)
    job = run_child(work, "beam", scale, fmt)
    for r in (ref, job):
        print(
            f"{r['variant']}: {r['rows_per_s']:,.0f} rows/s, work {r['work_s']:.1f}s, peak RSS {r['peak_rss_mb']:,.0f} MiB"
        )
    return compare_outputs(ref["out"], job["out"], f"x{scale} {fmt}: reference vs beam", ref["rows"], job["rows"])


# ----------------------------------------------------------------------------------------------
# Profile


def profile(work: str, scale: int, fmt: str, top: int) -> None:
    import cProfile
    import logging
    import pstats

    import tensorflow  # noqa: F401

    from pipeline import preprocess

    logging.basicConfig(level=logging.WARNING)
    path = input_path(work, scale, fmt)
    if not os.path.exists(path):
        prepare(work, [scale])
    config = flights_config(path, fmt)
    out = os.path.join(work, "out", f"{scale}x-{fmt}-profile")
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    rows = preprocess.preprocess(config, out)["rows"]
    profiler.disable()
    print(f"profiled run: {rows['read']:,} rows in {time.perf_counter() - started:.1f}s (with the profiler's overhead)")
    stats_path = os.path.join(work, f"profile_{scale}x_{fmt}.pstats")
    profiler.dump_stats(stats_path)
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    print(f"stats: {stats_path}  (python -m pstats {stats_path})")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_run":
        variant, path, fmt, out = argv[1:5]
        child(variant, path, fmt, out)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["prepare", "check", "bench", "profile", "compare", "all"])
    parser.add_argument("outputs", nargs="*", help="compare: two output directories (each holding preprocess/)")
    parser.add_argument("--work", default=WORK)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--formats", nargs="+", default=["parquet", "csv"], choices=["parquet", "csv"])
    parser.add_argument("--scale", type=int, default=1, help="check, profile")
    parser.add_argument("--format", default="parquet", choices=["parquet", "csv"], help="check, profile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-workers", action="store_true", help="bench: skip the 2-worker multi_processing runs")
    parser.add_argument("--threads", action="store_true", help="bench: also run 2 workers as threads (multi_threading)")
    parser.add_argument("--no-check", action="store_true", help="bench: skip the equality check of the last outputs")
    parser.add_argument("--top", type=int, default=40, help="profile: functions listed")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    args = parser.parse_args(argv)
    variants = ["reference", "beam"] + ([] if args.no_workers else ["beam2"]) + (["beam2t"] if args.threads else [])
    if args.command in ("prepare", "all"):
        prepare(args.work, sorted(set(args.scales) | {args.scale}))
    if args.command == "compare":
        if len(args.outputs) != 2:
            parser.error("compare takes two output directories")
        sys.exit(0 if compare_outputs(args.outputs[0], args.outputs[1], " vs ".join(args.outputs)) else 1)
    if args.command == "check":
        sys.exit(0 if check(args.work, args.scale, args.format) else 1)
    if args.command in ("bench", "all"):
        bench(args.work, args.scales, args.formats, args.repeats, variants, not args.no_check)
    if args.command == "profile":
        profile(args.work, args.scale, args.format, args.top)


if __name__ == "__main__":
    main()
