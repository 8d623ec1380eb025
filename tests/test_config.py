"""Config loading: the bundled configs load, and every kind of mistake names its field."""

import pytest
import tensorflow as tf

from embedpipe import cli
from schemas.config import AUTO_DIM_MAX, COLLABORATIVE_DIM_MIN, VocabularySide, auto_embedding_dim
from schemas.errors import ConfigError
from schemas.loading import load_config

from support import SMALL_CONFIG as GOOD
from support import config_error, edited


@pytest.mark.parametrize("name", ["taxi", "flights"])
def test_bundled_configs_load(name):
    config = load_config(name)
    assert config.name == name
    assert "dow_x_hour" in config.tables
    assert config.input.path.endswith(".csv" if name == "taxi" else ".parquet")


def test_good_config_parses_types_and_resolves_paths(write_config, tmp_path):
    config = load_config(write_config(GOOD))
    a, cross = config.categorical
    assert (a.type, a.top_k, a.oov_buckets, a.dim) == ("vocabulary", 10, 1, "auto")
    assert cross.is_cross and cross.columns == ("a", "b") and cross.hash_buckets == 32
    assert config.input.path == str(tmp_path / "data.csv")
    assert config.feature_columns == ["a", "b"]  # f is declared but read by nothing
    assert config.used_columns == {"y": "float", "a": "string", "b": "int"}


def test_a_config_on_a_remote_filesystem_resolves_paths_beside_it():
    """Any URL tf.io.gfile reads (gs:// in production; TensorFlow's in-memory ram:// here)."""
    folder = "ram://embedpipe-configs/nightly"
    tf.io.gfile.makedirs(folder)
    with tf.io.gfile.GFile(f"{folder}/small.yaml", "w") as f:
        f.write(edited(GOOD, "path: data.csv", "path: ../logs/data.csv"))
    assert load_config(f"{folder}/small.yaml").input.path == "ram://embedpipe-configs/logs/data.csv"
    with pytest.raises(ConfigError, match=r"^ram://embedpipe-configs/none\.yaml: no such config file$"):
        load_config("ram://embedpipe-configs/none.yaml")


@pytest.mark.parametrize(
    "old, new, field",
    [
        ("a: {type: vocabulary, top_k: 10}", "a: {type: vocabulary, topk: 10}", "categorical.a.topk: unknown key"),
        (
            "a: {type: vocabulary, top_k: 10}",
            "a: {type: vocabulary, column: c}",
            "categorical.a.column: column 'c' is not declared",
        ),
        (
            "a: {type: vocabulary, top_k: 10}",
            "a: {type: vocabulary, top_k: ten}",
            "categorical.a.top_k: expected an integer",
        ),
        ("columns: [a, b]", "columns: [a, nope]", "crosses.a_x_b.columns[1]: column 'nope' is not declared"),
        ("columns: [a, b]", "columns: [a]", "crosses.a_x_b.columns: a cross needs two or more columns"),
        ("b: int,", "b: integer,", "input.columns.b: expected one of string, int, float"),
        ("task: regression", "task: ranking", "label.task: expected one of"),
        (
            "a: {type: vocabulary, top_k: 10}",
            "b: {type: identity}",
            "categorical.b.num_buckets: an identity feature needs",
        ),
        (
            "a: {type: vocabulary, top_k: 10}",
            "a: {type: identity, num_buckets: 3}",
            "categorical.a.column: an identity feature needs an int",
        ),
        (
            "a: {type: vocabulary, top_k: 10}",
            "a: {type: hash, hash_buckets: 8, top_k: 3}",
            "categorical.a.top_k: does not apply",
        ),
        ("name: t", "name: t\nextra: 1", "extra: unknown key"),
        ("a: {type: vocabulary, top_k: 10}", "a.b: {type: vocabulary, column: a}", "a.b: a feature name must be"),
        ("columns: {y: float, a: string, b: int, f: float}", "columns: 5", "input.columns: expected a mapping"),
        ("columns: [a, b]", "columns: [a, f]", "crosses.a_x_b.columns[1]: column 'f' is float"),
        ("path: data.csv", "path: data.csv\n  delimiter: '\\n'", "input.delimiter: expected a single character"),
        (
            "a: {type: vocabulary, top_k: 10}",
            "f: {type: hash, hash_buckets: 9}",
            "categorical.f.column: column 'f' is float",
        ),
        ("task: regression", "task: multiclass", "label.column: a multiclass label must be"),
        ("task: regression", "task: binary, positive: 1", "label.positive: column 'y' is numeric"),
        ("task: regression", "task: regression, threshold: 15", "label.threshold: only a binary task takes"),
        ("task: regression", "task: binary, threshold: fifteen", "label.threshold: expected a number"),
        (
            "{column: y, task: regression}",
            "{column: a, task: binary, threshold: 1}",
            "label.threshold: column 'a' is a",
        ),
        ("hash_buckets: 32", "hash_buckets: 100000000000", "crosses.a_x_b.hash_buckets: expected an integer between"),
        (
            "a: {type: vocabulary, top_k: 10}",
            "label: {type: vocabulary, column: a}",
            "label: a feature cannot be named",
        ),
        (
            "name: t",
            "name: t\ndrift: {min_neighbor_overlap: 2}",
            "drift.min_neighbor_overlap: expected a number between 0 and 1",
        ),
        ("name: t", "name: t\ndrift: {max_drift: 0.1}", "drift.max_drift: unknown key"),
    ],
)
def test_bad_config_names_the_field(write_config, old, new, field):
    assert field in config_error(write_config(edited(GOOD, old, new)))


def test_cli_reports_bad_config_in_one_line(write_config, capsys):
    path = write_config(edited(GOOD, "columns: [a, b]", "columns: [a, nope]"))
    assert cli.main(["preprocess", "--config", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("embedpipe: error: ") and "crosses.a_x_b.columns[1]" in err


def test_cli_reports_missing_input_in_one_line(capsys, tmp_path):
    missing = str(tmp_path / "nope-*.csv")
    assert cli.main(["preprocess", "--input", missing, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("embedpipe: error: input.path: no file matches")
    assert missing in err


def test_auto_dim_is_fourth_root_clamped():
    assert auto_embedding_dim(168) == 4  # 7 days x 24 hours
    assert auto_embedding_dim(3) == 2  # clamped up
    assert auto_embedding_dim(10_000) == 10
    assert auto_embedding_dim(10**12) == AUTO_DIM_MAX


def test_a_collaborative_auto_dim_has_a_floor():
    items = VocabularySide("item", "item")
    assert auto_embedding_dim(9_067) == 10  # MovieLens' items: the rule alone
    assert items.embedding_dim(9_067) == COLLABORATIVE_DIM_MIN == 32
    assert items.embedding_dim(50**4) == 50  # above the floor the rule holds
    assert items.embedding_dim(10**12) == AUTO_DIM_MAX
    assert VocabularySide("item", "item", dim=8).embedding_dim(9_067) == 8  # an explicit dim wins
