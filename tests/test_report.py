"""The HTML run report: every table's section, escaped keys, no scripts, bounded size."""

import html
import json
import os
import re

import numpy as np
import pytest

from schemas.tables import TableSpec
from trainer import report
from trainer.export import write_table

AWKWARD = ["<b>bold</b>", "fish & chips", 'say "hi"', "it's", "naïve ☕", "tab\there"]
LINE_BREAKS = ["new\nline", "cr\rhere", "<hash 2>"]  # no vocabulary holds a line break: a hash table


@pytest.fixture
def run_dir(tmp_path):
    """A fake run: an `item` table with labels (3,000+ rows), a small `dow` table and a `tags` hash table."""
    rng = np.random.default_rng(0)
    out = tmp_path / "run"
    items = AWKWARD + [f"m{i:05d}" for i in range(3000)] + ["<OOV 0>"]
    frequency = np.concatenate([np.arange(len(items) - 1, 0, -1), [7]]).astype(np.int64)  # awkward keys most frequent
    labels = [f"Title <{k}> & co" for k in items[:-1]] + [""]
    spec = TableSpec("item", "vocabulary", ("item",), len(items), 8, len(items) - 1, 1)
    write_table(
        str(out / "export" / "item"),
        spec,
        items,
        rng.normal(size=(len(items), 8)).astype(np.float32),
        frequency,
        {"output_dir": str(out)},
        labels,
    )
    days = ["Mon", "Tue", "Wed", "<OOV 0>"]
    spec = TableSpec("dow", "vocabulary", ("dow",), 4, 2, 3, 1)
    write_table(
        str(out / "export" / "dow"),
        spec,
        days,
        rng.normal(size=(4, 2)).astype(np.float32),
        np.array([50, 30, 10, 10], dtype=np.int64),
        {"output_dir": str(out)},
    )
    spec = TableSpec("tags", "hash", ("tag",), 3, 2, None, 0)
    write_table(
        str(out / "export" / "tags"),
        spec,
        LINE_BREAKS,
        rng.normal(size=(3, 2)).astype(np.float32),
        np.array([5, 4, 0], dtype=np.int64),
        {"output_dir": str(out)},
    )
    manifest = {
        "preprocess": {
            "config": {"name": "fake <run>", "path": "fake.yaml", "sha256": "ab" * 32},
            "rows": {"read": 120, "train": 90, "eval": 20, "dead_letter": 10, "dead_letter_by_reason": {"bad_int": 10}},
        },
        "train": {
            "epoch_losses": {"two_tower": [3.0, 2.5, 2.2], "bag_of_history": [3.1, 2.4, float("nan")]},
            "eval_metrics": {"two_tower": {"recall@10": 0.5}, "popularity": {"recall@10": 0.1}},
            "headline_metric": {"name": "recall@10", "value": 0.5, "model": "two_tower"},
            "model_dir": str(out / "model"),
        },
        "export": {"tables": {"item": "elsewhere/item", "dow": "elsewhere/dow", "tags": "elsewhere/tags"}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out)


def test_report_has_summary_curves_and_every_table(run_dir):
    path = report.write_report(run_dir)
    assert path == os.path.join(run_dir, "report.html")
    page = open(path, encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for table in ("item", "dow", "tags"):
        assert f'<section id="table-{table}">' in page
    assert "fake &lt;run&gt;" in page and "90 train" in page and "bad_int 10" in page
    assert "two_tower" in page and page.count("<polyline") >= 2  # one loss curve per model
    # awkward keys and labels appear escaped, never as markup
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    assert "fish &amp; chips" in page and "say &quot;hi&quot;" in page and "it&#x27;s" in page
    assert "new\\nline" in page and "cr\\rhere" in page and "tab\\there" in page and "naïve ☕" in page
    assert "Title &lt;fish &amp; chips&gt; &amp; co" in page
    # self-contained and bounded: no scripts, no external resources, at most MAX_POINTS points per table
    assert "<script" not in page and not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert page.count("<circle class=") <= report.MAX_POINTS + 4 + 3
    assert len(page.encode()) < 1_000_000


def test_report_numbers(run_dir):
    page = open(report.write_report(run_dir, os.path.join(run_dir, "other.html")), encoding="utf-8").read()
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    # dow: 10 of 100 training occurrences hit the OOV row; fourth-root rule of a 3-value vocabulary
    assert "90.00% of 100 training occurrences" in text and "10 (10.00%) fall into the 1 OOV row" in text
    assert "round(3" in text and ") = 1" in text
    assert "no OOV rows: every one of 9 training occurrences has a row" in text  # tags: a hash table
    assert "1 of 3 non-OOV rows never occur in training" in text
    # the 10 most frequent item keys get 5 neighbours each; the OOV row is never one of them
    neighbors = page.split('id="table-item"')[1].split("</table>")[0]
    assert neighbors.count("<tr>") == 11 and "&lt;OOV 0&gt;" not in neighbors


def test_pca_2d_finds_the_main_axes():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(500, 3)) * [10.0, 3.0, 0.1]
    coords, share = report.pca_2d(points.astype(np.float32))
    assert coords.shape == (500, 2) and share[0] > 0.85 and share[0] > share[1] > 0.05
    np.testing.assert_allclose(np.abs(np.corrcoef(coords[:, 0], points[:, 0])[0, 1]), 1, atol=1e-3)
    one_dim, _ = report.pca_2d(rng.normal(size=(5, 1)))  # a 1-dim table still gets two coordinates
    assert one_dim.shape == (5, 2)


def test_missing_run_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        report.write_report(str(tmp_path))


def test_a_day_x_hour_table_is_coloured_by_hour(tmp_path):
    keys = [f"{day} x {hour}" for day in ("Mon", "Tue") for hour in (5, 12, 23)] + ["<OOV 0>"]
    spec = TableSpec("dow_x_hour", "vocabulary", ("dow", "hour"), 7, 2, 6, 1, separator=" x ")
    vectors = np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32)
    path = write_table(str(tmp_path / "t"), spec, keys, vectors, np.arange(7, 0, -1, dtype=np.int64), {})
    table = report.load_table(path)
    column, (lo, hi), colours = report.cross_colours(table, np.arange(6))
    assert (column, lo, hi) == ("hour", 5.0, 23.0)
    assert colours[0] == colours[3] == "hsl(240,80%,45%)" and colours[2] == colours[5] == "hsl(0,80%,45%)"
    section = report._table_section(table)
    assert "colour: hour, from 5" in section and section.count('style="fill:hsl(') == 6  # not the OOV row
    # a cross of two string columns has nothing to colour by; neither has a single-column table
    spec = TableSpec("a_x_b", "vocabulary", ("a", "b"), 2, 2, 2, 0, separator=" x ")
    strings = report.load_table(write_table(str(tmp_path / "s"), spec, ["x x y", "y x z"], vectors[:2], np.ones(2), {}))
    assert report.cross_colours(strings, np.arange(2)) is None
