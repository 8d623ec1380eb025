"""A one-page HTML report of a run: what went in, how training went, what the tables learned.

    embedpipe report embedpipe_output/taxi                 # the latest run -> <its run dir>/report.html
    embedpipe report embedpipe_output/taxi --out /tmp/taxi.html

    from trainer.report import write_report
    write_report("embedpipe_output/taxi")                 # returns the path written

The page is self-contained (inline CSS and SVG, no JavaScript, nothing fetched) and stays small
whatever the table sizes: each table shows at most `MAX_POINTS` points (its most frequent rows).
It holds:

* the run summary from `<output>/manifest.json`: config, inputs, rows per split and dead letters
  per reason, eval metrics, timings;
* training curves: per-epoch metrics of a supervised run (`history` in the manifest's `train`
  section, else `<model_dir>/history.json`, train and eval on one chart per metric), the
  per-model epoch losses, validation curves and recency weights of a collaborative run, and
  the baseline's curves;
* per exported table (`trainer.tables.load_table`): a 2-D PCA projection of the most frequent
  rows (labelled with item titles where the table has labels; a cross's points coloured by its
  numeric part, a day x hour table's by hour: `cross_colours`), the cosine nearest neighbours of
  the most frequent keys (OOV rows never returned), vocabulary coverage (the share of training
  occurrences that hit an OOV row) and the dimension against the fourth-root rule.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import time

import numpy as np
import tensorflow as tf

from schemas import layout
from schemas.config import AUTO_DIM_MAX, AUTO_DIM_MIN, COLLABORATIVE_DIM_MIN, auto_embedding_dim
from schemas.manifest import read_manifest
from trainer.drift import NEIGHBOR_K
from trainer.neighbors import NeighborIndex
from trainer.tables import EmbeddingTable, load_table

_LOG = logging.getLogger(__name__)

MAX_POINTS = 2000  # points drawn per table: its most frequent rows
LABELLED = 30  # of which this many carry a text label
QUERIES = 10  # nearest neighbours of this many most frequent keys ...
NEIGHBORS = 5  # ... this many each
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_CONTROL = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def write_report(output_dir: str, path: str | None = None) -> str:
    """Writes the report of the run in `output_dir` (default `<output_dir>/report.html`); returns its path."""
    started = time.time()
    manifest = read_manifest(output_dir)
    tables = _table_dirs(output_dir, manifest)
    if not manifest and not tables:
        raise FileNotFoundError(f"{output_dir}: no manifest.json and no exported tables; run `embedpipe run` first")
    title = manifest.get("preprocess", {}).get("config", {}).get("name") or os.path.basename(output_dir.rstrip("/"))
    sections = [_summary(output_dir, manifest, tables), _training(output_dir, manifest)]
    if manifest.get("drift", {}).get("tables"):
        sections.append(_drift(manifest["drift"]))
    for name, table_path in tables.items():
        t0 = time.time()
        table = load_table(table_path)
        _LOG.info("report: table %s: %d rows x %d dims loaded (%.1fs)", name, len(table), table.dim, time.time() - t0)
        sections.append(_table_section(table, collaborative="recommender" in manifest.get("export", {})))
        _LOG.info(
            "report: table %s: projection and neighbours done (%.0f KiB, %.1fs)",
            name,
            len(sections[-1].encode()) / 1024,
            time.time() - t0,
        )
    page = _page(f"embedpipe report: {title}", output_dir, list(tables), sections)
    path = path or os.path.join(output_dir, layout.REPORT)
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(page)
    _LOG.info("report: wrote %s (%.0f KiB, %.1fs)", path, len(page.encode()) / 1024, time.time() - started)
    return path


def _table_dirs(output_dir: str, manifest: dict) -> dict[str, str]:
    """{table name: directory} under `<output>/export/` (names from the manifest, else the directory)."""
    export = layout.export_dir(output_dir)
    names = list(manifest.get("export", {}).get("tables", {}))
    if not names and tf.io.gfile.isdir(export):
        found = [d.rstrip("/") for d in tf.io.gfile.listdir(export)]
        names = sorted(d for d in found if tf.io.gfile.exists(os.path.join(export, d, layout.TABLE_MANIFEST)))
    return {name: layout.table_dir(output_dir, name) for name in names}


# --- run summary and training curves -------------------------------------------------------


def _summary(output_dir: str, manifest: dict, tables: dict) -> str:
    pre, train = manifest.get("preprocess", {}), manifest.get("train", {})
    config, inputs, rows = pre.get("config", {}), pre.get("inputs", {}), pre.get("rows", {})
    sha = config.get("sha256") and f"sha256 {config['sha256'][:12]}"
    files = "files" in inputs and f"{len(inputs['files'])} file(s)"
    facts = [
        ("config", _e(config.get("name", "?")) + _aside(config.get("path"), sha) if config else "<i>not recorded</i>"),
        ("input", _e(inputs.get("path", "?")) + _aside(inputs.get("format"), files) if inputs else ""),
        ("output", _e(output_dir)),
    ]
    if rows:
        reasons = ", ".join(f"{_e(k)} {v:,}" for k, v in sorted(rows.get("dead_letter_by_reason", {}).items()))
        facts.append(
            (
                "rows",
                f"{rows.get('read', 0):,} read &middot; {rows.get('train', 0):,} train &middot; "
                f"{rows.get('eval', 0):,} eval &middot; {rows.get('dead_letter', 0):,} dead-lettered"
                + (f" <span class=dim>({reasons})</span>" if reasons else ""),
            )
        )
    if "users_evaluated" in pre:
        facts.append(("users evaluated", f"{pre['users_evaluated']:,}"))
    if train:
        head = train.get("headline_metric", {})
        model = f" (best model: {_e(head['model'])})" if "model" in head else ""
        epochs = f" after {train['epochs_run']} epochs" if "epochs_run" in train else ""
        facts.append(("headline", f"<b>eval {_e(head.get('name', '?'))} {_num(head.get('value'))}</b>{model}{epochs}"))
    facts.append(("tables", ", ".join(f'<a href="#table-{_e(n)}">{_e(n)}</a>' for n in tables) or "none exported"))
    timings = {}
    for section in ("preprocess", "train", "baseline", "export"):
        timings.update(manifest.get(section, {}).get("timings_s", {}))
    if timings:
        facts.append(("timings", " &middot; ".join(f"{_e(k)} {v:.1f}s" for k, v in timings.items())))
    if manifest.get("package_versions"):
        facts.append(
            (
                "packages",
                "<span class=dim>"
                + ", ".join(f"{_e(k)} {_e(v)}" for k, v in manifest["package_versions"].items())
                + "</span>",
            )
        )
    body = "<dl class=facts>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts if v) + "</dl>"
    for section, caption in (("train", "eval metrics"), ("baseline", "baseline eval metrics (no embedding tables)")):
        if manifest.get(section, {}).get("eval_metrics"):
            body += _metrics_table(manifest[section]["eval_metrics"], caption)
    return f"<section><h2>Run</h2>{body}</section>"


def _metrics_table(metrics: dict, caption: str) -> str:
    """Supervised: {metric: value}; collaborative: {model or "popularity": {metric: value}}."""
    nested = {k: v for k, v in metrics.items() if isinstance(v, dict)} or {"": metrics}
    names = sorted({m for values in nested.values() for m in values})
    head = "<tr><th></th>" + "".join(f"<th>{_e(m)}</th>" for m in names) + "</tr>"
    body = "".join(
        f"<tr><th>{_e(model)}</th>" + "".join(f"<td>{_num(values.get(m))}</td>" for m in names) + "</tr>"
        for model, values in nested.items()
    )
    return f"<table class=metrics><caption>{_e(caption)}</caption>{head}{body}</table>"


def _training_curves(output_dir: str, manifest: dict) -> list[tuple[str, str, dict[str, list[float]]]]:
    """[(title, x axis label, {series: values})] for every per-epoch curve the run recorded."""
    charts = []
    for section_name in ("train", "baseline"):
        section = manifest.get(section_name)
        if not section:
            continue
        prefix = "baseline: " if section_name == "baseline" else ""
        if "epoch_losses" in section:  # collaborative: {model: [loss per epoch]}
            charts.append((f"{prefix}training loss per model", "epoch", section["epoch_losses"]))
        curves = {m: c for m, c in section.get("validation_curves", {}).items() if c}
        if curves:  # collaborative: {model: [validation headline metric per epoch]}
            headline = section.get("headline_metric", {}).get("name", "metric")
            charts.append((f"{prefix}validation {headline} per model (chooses epochs and model)", "epoch", curves))
        history = _history_file(output_dir, section_name, section)
        for metric, series in _group_history(history).items():
            charts.append((prefix + metric, "epoch", series))
        for model, weights in section.get("history_weights", {}).items():
            charts.append(
                (
                    f"{prefix}{model}: weight of the history item at each position",
                    "position (0 = newest)",
                    {"weight": weights},
                )
            )
    return charts


def _history_file(output_dir: str, section_name: str, section: dict) -> dict:
    """Keras' per-epoch history of a supervised run, written next to the model (at the recorded
    model_dir, else where it is under `output_dir`: a run directory can be moved)."""
    candidates = [layout.history_path(section["model_dir"])] if section.get("model_dir") else []
    candidates.append(layout.history_path(layout.model_dir(output_dir, section_name == "baseline")))
    for path in candidates:
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path) as f:
                return json.load(f)
    return {}


def _group_history(history: dict) -> dict[str, dict[str, list[float]]]:
    """{"loss": [...], "val_loss": [...], ...} -> {"loss": {"train": [...], "validation": [...]}, ...}
    (Keras' `val_` metrics are the validation slice's, carved from the training split)."""
    grouped: dict[str, dict[str, list[float]]] = {}
    for name, values in history.items():
        if not isinstance(values, list):
            continue
        base, split = (name[4:], "validation") if name.startswith("val_") else (name, "train")
        grouped.setdefault(base, {})[split] = values
    return {k: dict(sorted(v.items(), key=lambda kv: kv[0] != "train")) for k, v in grouped.items()}


def _training(output_dir: str, manifest: dict) -> str:
    charts = _training_curves(output_dir, manifest)
    if not charts:
        return "<section><h2>Training</h2><p class=dim>No per-epoch curves in this run's manifest.</p></section>"
    figures = "".join(
        f"<figure><figcaption class=title>{_e(title)}{_legend(series)}</figcaption>"
        f"{_line_chart(series, x_label)}</figure>"
        for title, x_label, series in charts
    )
    return f"<section><h2>Training</h2><div class=charts>{figures}</div></section>"


def _drift(drift: dict) -> str:
    """The manifest's `drift` section (`trainer.drift`): one row per table."""
    columns = ("keys_added", "keys_removed", "new_key_traffic", "frequency_linf", "neighbor_overlap")
    head = "<tr><th>table</th>" + "".join(f"<th>{_e(c.replace('_', ' '))}</th>" for c in columns) + "</tr>"
    body = "".join(
        f"<tr><th>{_e(name)}</th>" + "".join(f"<td>{_num(values.get(c))}</td>" for c in columns) + "</tr>"
        for name, values in drift["tables"].items()
    )
    return (
        f"<section><h2>Drift since the last published run</h2><p class=dim>against {_e(drift.get('against', '?'))}: "
        "new key traffic = share of training rows on keys the last run did not have; frequency L-inf = largest change "
        f"of one key's share; neighbour overlap = mean share of top-{NEIGHBOR_K} neighbours kept</p>"
        f"<table class=metrics>{head}{body}</table></section>"
    )


def _legend(series: dict) -> str:
    if len(series) < 2:
        return ""
    return " " + " ".join(
        f'<span class=swatch style="background:{COLORS[i % len(COLORS)]}"></span>{_e(name)}'
        for i, name in enumerate(series)
    )


def _line_chart(series: dict[str, list[float]], x_label: str, width: int = 400, height: int = 230) -> str:
    left, right, top, bottom = 56, 12, 10, 38
    values = [v for vs in series.values() for v in vs if _finite(v)]
    n = max((len(vs) for vs in series.values()), default=0)
    if not values or n == 0:
        return f'<svg width="{width}" height="{height}"><text x="10" y="20">no values</text></svg>'
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    y_ticks = _nice_ticks(lo, hi)
    lo, hi = min(lo, y_ticks[0]), max(hi, y_ticks[-1])
    x0, x1 = (0, n - 1) if x_label.startswith("position") else (1, n)  # epochs count from 1
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (pw * (x - x0) / (x1 - x0) if x1 > x0 else pw / 2)

    def sy(y: float) -> float:
        return top + ph * (1 - (y - lo) / (hi - lo))

    out = [f'<svg class=chart width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    for t in y_ticks:
        out.append(
            f'<line class=grid x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
            f'<text class=tick x="{left - 5}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>'
        )
    for t in _int_ticks(x0, x1):
        out.append(f'<text class=tick x="{sx(t):.1f}" y="{top + ph + 15}" text-anchor="middle">{t}</text>')
    out.append(f'<rect class=frame x="{left}" y="{top}" width="{pw}" height="{ph}"/>')
    out.append(f'<text class=axis x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">{_e(x_label)}</text>')
    for i, (name, vs) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        points = [(sx(x0 + j), sy(v)) for j, v in enumerate(vs) if _finite(v)]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            out.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}">'
                f"<title>{_e(name)}</title></polyline>"
            )
        if len(points) <= 30:
            out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in points)
    out.append("</svg>")
    return "".join(out)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    ticks = [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]
    return [round(t, 12) for t in ticks]


def _int_ticks(x0: int, x1: int, count: int = 10) -> list[int]:
    step = max(1, math.ceil((x1 - x0) / count))
    return list(range(x0, x1 + 1, step))


# --- tables ---------------------------------------------------------------------------------


def _table_section(table: EmbeddingTable, collaborative: bool = False) -> str:
    m = table.manifest
    rows, dim, real = len(table), table.dim, table.real_rows
    frequency = np.asarray(table.frequencies, dtype=np.int64)
    total, oov = int(frequency.sum()), int(frequency[real:].sum())
    unseen = int((frequency[:real] == 0).sum())
    vocabulary = m.get("vocabulary_size")
    rule_of = vocabulary if vocabulary else rows
    rule = round(rule_of**0.25)
    floor = COLLABORATIVE_DIM_MIN if collaborative else AUTO_DIM_MIN
    collaborative_note = ": a collaborative table is the whole model" if collaborative else ""
    facts = [
        ("kind", f"{_e(m.get('kind', '?'))} of {_e(', '.join(m.get('columns', [])))}"),
        (
            "rows",
            f"{rows:,}"
            + (
                f" ({vocabulary:,} vocabulary + {rows - real} OOV)"
                if vocabulary
                else f" ({rows - real} OOV)"
                if rows > real
                else ""
            ),
        ),
        (
            "dimension",
            f"<b>{dim}</b> &middot; fourth-root rule: round({rule_of:,}<sup>1/4</sup>) = {rule}"
            + ("" if dim == rule else f" <span class=dim>({'+' if dim > rule else ''}{dim - rule})</span>")
            + f" <span class=dim>&middot; <code>dim: auto</code> = {auto_embedding_dim(rows, floor)} "
            f"(rows incl. OOV, clamped to [{floor}, {AUTO_DIM_MAX}]{collaborative_note})</span>",
        ),
    ]
    if total == 0:
        facts.append(("coverage", "<span class=dim>no training occurrences recorded</span>"))
    elif rows > real:
        share = oov / total
        facts.append(
            (
                "coverage",
                f"<b>{1 - share:.2%}</b> of {total:,} training occurrences have their own row; "
                f"{oov:,} ({share:.2%}) fall into the {rows - real} OOV row(s)",
            )
        )
    else:
        facts.append(("coverage", f"no OOV rows: every one of {total:,} training occurrences has a row"))
    if total:
        facts.append(("unseen rows", f"{unseen:,} of {real:,} non-OOV rows never occur in training"))
    if m.get("projector_rows", rows) < rows:
        facts.append(("projector", f"TensorBoard shows the {m['projector_rows']:,} most frequent rows"))
    shown = np.argsort(-frequency, kind="stable")[:MAX_POINTS]
    scatter = _pca_scatter(table, shown, real)
    neighbors = _neighbors_table(table, frequency)
    dl = "<dl class=facts>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
    name = _e(table.name)
    return (
        f'<section id="table-{name}"><h2>Table <code>{name}</code></h2>{dl}'
        f"<div class=table-body><figure>{scatter}</figure><div>{neighbors}</div></div></section>"
    )


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 2] coordinates on the first two principal components, and the share of variance of each."""
    centered = vectors.astype(np.float64) - vectors.mean(axis=0, keepdims=True)
    if centered.shape[1] < 2:
        centered = np.pad(centered, ((0, 0), (0, 2 - centered.shape[1])))
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    variance = s**2
    share = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(2)
    return centered @ vt[:2].T, share


def _pca_scatter(table: EmbeddingTable, shown: np.ndarray, real: int, width: int = 620) -> str:
    if len(shown) < 2:
        return "<p class=dim>Too few rows to project.</p>"
    height = 300 if len(shown) <= 12 else 440
    coords, share = pca_2d(table.vectors[shown])
    # Each axis fills the plot (PC2 is stretched: its share of variance is in the caption); the
    # margins leave room for labels next to the outermost points.
    pad = np.array([70.0, 18.0])
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = np.maximum(hi - lo, 1e-12 * max(1.0, float(np.abs(coords).max())))
    xy = pad + (coords - lo) / span * (np.array([width, height]) - 2 * pad)
    xy[:, 1] = height - xy[:, 1]
    frequency = np.asarray(table.frequencies)[shown].astype(np.float64)
    radius = 1.6 + 3.4 * np.log1p(frequency) / max(np.log1p(frequency.max()), 1e-9)
    labels = table.labels
    coloured = cross_colours(table, shown[shown < real])
    out = [
        f'<svg class=scatter width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<rect class=frame x="0.5" y="0.5" width="{width - 1}" height="{height - 1}"/>',
    ]
    # least frequent first, so that the frequent points are drawn on top; OOV rows last
    for i in sorted(range(len(shown)), key=lambda i: (shown[i] >= real, -i)):
        row = int(shown[i])
        cls, r = ("oov", max(radius[i], 3.0)) if row >= real else ("top" if i < LABELLED else "pt", radius[i])
        tip = _display(table.keys[row]) + (f" — {_display(labels[row])}" if labels and labels[row] else "")
        fill = f' style="fill:{coloured[2][row]}"' if coloured and row in coloured[2] else ""
        out.append(
            f'<circle class={cls}{fill} cx="{xy[i, 0]:.1f}" cy="{xy[i, 1]:.1f}" r="{r:.1f}">'
            f"<title>{_e(tip)} ({int(frequency[i]):,})</title></circle>"
        )
    placed: list[tuple[float, float, float, float]] = []
    for i in range(min(LABELLED, len(shown))):
        row = int(shown[i])
        text = _short(labels[row] if labels and labels[row] else table.keys[row])
        box = _place_label(xy[i, 0], xy[i, 1], 6.6 * len(text) + 2, 13, placed, width, height)
        if box is not None:
            placed.append(box)
            out.append(f'<text class=label x="{box[0] + 1:.1f}" y="{box[1] + 10:.1f}">{_e(text)}</text>')
    out.append("</svg>")
    wanted = min(LABELLED, len(shown))
    crowded = f" ({wanted - len(placed)} left out where they would overlap)" if len(placed) < wanted else ""
    scale = (
        f"; colour: {_e(coloured[0])}, from {coloured[1][0]:g} (<span style=color:{_hue(0)}>blue</span>) to "
        f"{coloured[1][1]:g} (<span style=color:{_hue(1)}>red</span>)"
        if coloured
        else ""
    )
    caption = (
        f"PCA of the {len(shown):,} most frequent rows (PC1 {share[0]:.0%}, PC2 {share[1]:.0%} of their "
        f"variance); {'labelled' if coloured else 'dark, labelled'}: the {wanted} most frequent{crowded}{scale}"
        + ("; <span class=oov-key>ringed in red</span>: OOV rows" if (shown >= real).any() else "")
        + "; hover a point for its key and training count."
    )
    return "".join(out) + f"<figcaption>{caption}</figcaption>"


def cross_colours(table: EmbeddingTable, rows: np.ndarray) -> tuple[str, tuple[float, float], dict[int, str]] | None:
    """Colours for the points of a cross by one of its numeric parts (a day x hour table by hour).

    The part is the cross's column whose values, in the keys of `rows`, are all numbers, the one
    with the most distinct values when several are; colours run from blue (lowest) to red.

    Returns:
        (column, (lowest, highest), {row: CSS colour}), or None when the table is not a cross,
        no part is numeric or it takes one value only.
    """
    columns, separator = table.manifest.get("columns", []), table.manifest.get("separator")
    if len(columns) < 2 or not separator or len(rows) == 0:
        return None
    parts = [table.keys[int(row)].split(separator) for row in rows]
    if any(len(p) != len(columns) for p in parts):
        return None
    best = None
    for j, column in enumerate(columns):
        try:
            values = np.array([float(p[j]) for p in parts])
        except ValueError:
            continue
        distinct = len(np.unique(values))
        if distinct > 1 and np.isfinite(values).all() and (best is None or distinct > best[0]):
            best = (distinct, column, values)
    if best is None:
        return None
    _, column, values = best
    lo, hi = float(values.min()), float(values.max())
    return column, (lo, hi), {int(row): _hue((v - lo) / (hi - lo)) for row, v in zip(rows, values)}


def _hue(position: float) -> str:
    """A colour from blue (0) through green to red (1)."""
    return f"hsl({240 * (1 - position):.0f},80%,45%)"


def _place_label(x, y, w, h, placed, width, height) -> tuple[float, float, float, float] | None:
    """A box for a label next to (x, y) that overlaps no label placed so far, or None."""
    for d in (4, 12):
        for cx, cy in (
            (x + d, y - h / 2),
            (x - d - w, y - h / 2),
            (x - w / 2, y - d - h),
            (x - w / 2, y + d),
            (x + d, y - h - d / 2),
            (x + d, y + d / 2),
            (x - d - w, y - h - d / 2),
            (x - d - w, y + d / 2),
        ):
            cx, cy = min(max(cx, 2), width - w - 2), min(max(cy, 2), height - h - 2)
            if all(cx + w <= bx or bx + bw <= cx or cy + h <= by or by + bh <= cy for bx, by, bw, bh in placed):
                return cx, cy, w, h
    return None


def _neighbors_table(table: EmbeddingTable, frequency: np.ndarray) -> str:
    real = table.real_rows
    if real < 2:
        return "<p class=dim>Too few rows for nearest neighbours.</p>"
    index = NeighborIndex(table)
    queries = np.argsort(-frequency[:real], kind="stable")[:QUERIES]
    k = min(NEIGHBORS, real - 1)
    rows = []
    for row in queries:
        row = int(row)
        found = index.neighbors_of_row(row, k)
        cells = "".join(
            f"<td>{_key_html(key, label)}<span class=score>{score:+.3f}</span></td>" for key, label, score in found
        )
        query = _key_html(table.keys[row], table.label(row))
        rows.append(f"<tr><th>{query}<span class=score>{int(frequency[row]):,}&times;</span></th>{cells}</tr>")
    head = "<tr><th>key (training count)</th>" + "".join(f"<th>#{i + 1}</th>" for i in range(k)) + "</tr>"
    return (
        f"<table class=neighbors><caption>Nearest neighbours of the {len(queries)} most frequent keys, with "
        f"their cosine similarity (OOV rows are never returned)</caption>{head}{''.join(rows)}</table>"
    )


def _key_html(key: str, label: str) -> str:
    if label and label != key:
        return f"<span class=key>{_e(_short(label, 40))}</span><span class=sub>{_e(_short(key, 40))}</span>"
    return f"<span class=key>{_e(_short(key, 40))}</span>"


# --- HTML helpers ---------------------------------------------------------------------------


def _aside(*parts) -> str:
    """ " (a, b)" in grey, for the parts that are there."""
    parts = [_e(p) for p in parts if p]
    return f" <span class=dim>({', '.join(parts)})</span>" if parts else ""


def _e(text) -> str:
    """Text for HTML and inline SVG: control characters made visible, markup characters escaped."""
    return html.escape(_display(str(text)), quote=True)


def _display(text: str) -> str:
    return "".join(_CONTROL.get(c, f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in text)


def _short(text: str, limit: int = 24) -> str:
    text = _display(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else _e(value)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #222;
       margin: 0; background: #f5f6f8; }
main { max-width: 1360px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 2px; } h2 { font-size: 18px; margin: 0 0 10px; }
nav { color: #555; margin-bottom: 12px; } nav a { margin-right: 10px; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 14px 18px; margin: 14px 0; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 0 0 10px; }
.facts dt { color: #666; } .facts dd { margin: 0; overflow-wrap: anywhere; }
.dim { color: #777; } code { font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
.neighbors { width: 100%; table-layout: fixed; } .neighbors tr:first-child th:first-child { width: 24%; }
caption { text-align: left; color: #555; padding-bottom: 4px; }
th, td { border-bottom: 1px solid #e6e8eb; padding: 4px 8px; text-align: left; vertical-align: top; }
.metrics td { font-variant-numeric: tabular-nums; text-align: right; }
.charts { display: flex; flex-wrap: wrap; gap: 12px 24px; }
figure { margin: 0; } figcaption { color: #444; font-size: 13px; margin-top: 2px; max-width: 660px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin: 0 4px 0 8px; }
svg text { font: 11px system-ui, "DejaVu Sans", sans-serif; }
.frame { fill: none; stroke: #c9ced6; } .grid { stroke: #eceef1; } .tick { fill: #666; } .axis { fill: #444; }
.scatter { background: #fcfcfd; }
.pt { fill: #1f77b4; fill-opacity: .45; } .top { fill: #0b4f8a; fill-opacity: .9; }
.oov { fill: #fff; stroke: #d62728; stroke-width: 2; }
.label { fill: #111; paint-order: stroke; stroke: #fff; stroke-width: 3px; stroke-linejoin: round; }
.oov-key { color: #d62728; font-weight: 600; }
.table-body { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.table-body > div { flex: 1 1 560px; min-width: 0; }
.neighbors th, .neighbors td { max-width: 160px; overflow-wrap: break-word; }
.neighbors tr:first-child th { white-space: nowrap; }
.key { display: block; } .sub { display: block; color: #777; font-size: 11px; }
.score { display: block; color: #888; font-size: 11px; font-variant-numeric: tabular-nums; }
"""


def _page(title: str, output_dir: str, tables: list[str], sections: list[str]) -> str:
    nav = "".join(f'<a href="#table-{_e(n)}">{_e(n)}</a>' for n in tables)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1><nav>{_e(output_dir)}{' &middot; tables: ' + nav if nav else ''}</nav>"
        + "".join(sections)
        + "</main></body></html>\n"
    )
