"""A loopback HTTPS proxy that lets TensorFlow's GCS filesystem talk to a local GCS emulator.

TensorFlow has the GCS endpoints compiled in (`https://www.googleapis.com/...`,
`https://storage.googleapis.com/...`) and no variable to point them elsewhere, but its libcurl
honours `https_proxy` and `CURL_CA_BUNDLE`. This proxy answers `CONNECT` on 127.0.0.1, ends the
TLS itself with a certificate for those hosts signed by a throwaway CA it writes on start, and
relays each HTTP request to the emulator (fake-gcs-server), rewriting what the emulator gets
wrong for a real client: upload `Location` headers back to https, and `.../storageLayout`
(which TensorFlow asks for before a directory rename and fake-gcs-server does not know)
answered as a bucket without hierarchical namespace.

The same port also takes plain HTTP requests as if it were the emulator itself
(`STORAGE_EMULATOR_HOST` names it), for google-cloud-storage and so Beam's GcsIO: it adds the
`Content-ID` to each part of a batch request (Beam's renames and deletes) that fake-gcs-server
needs to answer the part. It can also fail a share of the requests it relays on either path
(`set_faults`), for failure-injection tests.

Run as a separate process (`start_proxy`): a TensorFlow call that holds the GIL while it waits
for its own request would deadlock an in-process proxy.

    python tests/gcs_proxy.py EMULATOR_HOST EMULATOR_PORT CERT_DIR    # prints its port
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import random
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOSTS = ("www.googleapis.com", "storage.googleapis.com")
CA_FILE = "ca.pem"
STORAGE_LAYOUT = b'{"kind": "storage#storageLayout", "hierarchicalNamespace": {"enabled": false}}'
# Request headers the relay sets itself (the body is re-sent with its length).
_DROPPED = {"proxy-connection", "transfer-encoding", "content-length", "expect"}


def write_certificates(folder: str) -> tuple[str, str]:
    """A throwaway CA (`folder/ca.pem`, for `CURL_CA_BUNDLE`) and a certificate for `HOSTS`
    signed by it; returns (certificate file, key file)."""
    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_valid_before": now - datetime.timedelta(hours=1), "not_valid_after": now + datetime.timedelta(days=1)}
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "embedpipe test CA")])
    ca = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder(subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[0])]),
                                issuer_name=ca_name, public_key=key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    files = [os.path.join(folder, name) for name in (CA_FILE, "cert.pem", "key.pem")]
    contents = [
        ca.public_bytes(serialization.Encoding.PEM),
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    ]
    for path, content in zip(files, contents):
        with open(path, "wb") as f:
            f.write(content)
    return files[1], files[2]


class _Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # one line per request would flood the test output
        return

    def do_CONNECT(self):
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.connection = self.server.tls.wrap_socket(self.connection, server_side=True)
        # unbuffered writes: an interim `100 Continue` must leave at once (curl waits a second for it)
        self.rfile, self.wfile = self.connection.makefile("rb"), self.connection.makefile("wb", buffering=0)
        self.close_connection = False
        while not self.close_connection:  # every request of the tunnel, until the client closes it
            self.handle_one_request()

    def _body(self) -> bytes | None:
        if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else None
        parts = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            continue
        return b"".join(parts)

    def _reply(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        # one write for the whole response: header and body in separate small writes would wait
        # on the client's delayed ACK (about 40 ms a request)
        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self._headers_buffer.append(b"\r\n")
        self.wfile.write(b"".join(self._headers_buffer) + (b"" if self.command == "HEAD" else data))
        self._headers_buffer = []

    def _relay(self):
        tunnelled = isinstance(self.connection, ssl.SSLSocket)  # TensorFlow's, through CONNECT
        if not tunnelled and self.path.startswith("/faults"):  # a request to the proxy itself
            return self._control()
        body = self._body()
        if not tunnelled and self.path.startswith("/batch/") and body:
            body = _with_content_ids(body)
        faults = self.server.faults
        with self.server.lock:
            faults["requests"] += 1
            fail = faults["rate"] > 0 and self.server.random.random() < faults["rate"]
            kind = faults["kind"] if faults["kind"] != "mixed" else self.server.random.choice(("503", "reset"))
            if fail:
                faults["failed"][kind] = faults["failed"].get(kind, 0) + 1
        if fail and kind == "503":  # refused before the emulator saw it: always safe to retry
            return self._reply(503, "Service Unavailable", [("Content-Type", "application/json")], b"{}")
        if self.path.split("?")[0].endswith("/storageLayout"):
            return self._reply(200, "OK", [("Content-Type", "application/json")], STORAGE_LAYOUT)
        connection = http.client.HTTPConnection(*self.server.emulator, timeout=60)
        connection.connect()
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROPPED}
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        if fail:  # "reset": the emulator did the work, but the client never hears so
            self.close_connection = True
            self.connection.close()
            return None
        out = []
        for name, value in response.getheaders():
            if name.lower() in ("transfer-encoding", "content-length", "connection"):
                continue
            if name.lower() == "location":  # the emulator answers with its own scheme and address
                host, port = self.server.emulator
                here = f"https://{HOSTS[0]}" if tunnelled else "http://{}:{}".format(*self.server.server_address)
                value = value.replace(f"http://{host}:{port}", here)
                for host in HOSTS if tunnelled else ():
                    value = value.replace(f"http://{host}", f"https://{host}")
            out.append((name, value))
        self._reply(response.status, response.reason, out, data)

    def _control(self):
        """`GET /faults?rate=R&kind=503|reset|mixed&seed=S` sets the share of relayed requests
        that fail (and zeroes the counts); both return the counts so far, JSON."""
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
        with self.server.lock:
            data = json.dumps(self.server.faults).encode()
            if "rate" in query:
                self.server.faults.update(
                    rate=float(query["rate"]), kind=query.get("kind", "503"), requests=0, failed={}
                )
                self.server.random.seed(int(query.get("seed", 0)))
        self._reply(200, "OK", [("Content-Type", "application/json")], data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _relay


def _with_content_ids(body: bytes) -> bytes:
    """A batch request's multipart body with a `Content-ID` header in every part (google-cloud-
    storage sends none; fake-gcs-server answers only the parts that have one)."""
    ids = iter(range(1, 1 << 31))
    return re.sub(
        rb"(Content-Type: application/http\r?\n)", lambda m: m.group(1) + b"Content-ID: <part%d>\r\n" % next(ids), body
    )


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True


def serve(emulator_host: str, emulator_port: int, folder: str) -> _Server:
    """The proxy on 127.0.0.1 (an ephemeral port), serving in a thread."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*write_certificates(folder))
    server = _Server(("127.0.0.1", 0), _Relay)
    server.tls, server.emulator = context, (emulator_host, emulator_port)
    server.lock, server.random = threading.Lock(), random.Random(0)
    server.faults = {"rate": 0.0, "kind": "503", "requests": 0, "failed": {}}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_proxy(emulator: str, folder: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """This module as a process, relaying to `emulator` (`http://HOST:PORT`).

    Returns:
        (the process, the environment TensorFlow needs to reach the emulator through it).
    """
    host, _, port = emulator.removeprefix("http://").partition(":")
    process = subprocess.Popen([sys.executable, __file__, host, port, folder], stdout=subprocess.PIPE, text=True)
    proxy_port = int(process.stdout.readline())
    credentials = os.path.join(folder, "credentials.json")
    with open(credentials, "w") as f:  # a valid token: no auth library asks a service for one
        json.dump({"type": "authorized_user", "client_id": "test", "client_secret": "test", "refresh_token": "test",
                   "token": "test-token", "expiry": "2999-01-01T00:00:00Z"}, f)  # fmt: skip
    env = {
        "https_proxy": f"http://127.0.0.1:{proxy_port}",
        # google-cloud-storage (Beam's GcsIO, the LATEST pointer) through the proxy's plain port
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{proxy_port}",
        # Beam looks for default credentials for ~19 s (with retries) before going anonymous
        "GOOGLE_APPLICATION_CREDENTIALS": credentials,
        "no_proxy": "127.0.0.1,localhost",  # the emulator itself, and any local service
        "CURL_CA_BUNDLE": os.path.join(folder, CA_FILE),
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",  # TensorFlow asks no auth service then
        # TensorFlow's retries of a failed request: a few, quickly (by default it waits up to 32 s)
        "GCS_RETRY_CONFIG_MAX_RETRIES": "3",
        "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "10000",
        "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "100000",
    }
    return process, env


def set_faults(env: dict[str, str], rate: float, kind: str = "503", seed: int = 0) -> dict:
    """Makes the proxy that `env` (from `start_proxy`) names fail `rate` of the requests it
    relays (on both paths) from now on: `503` (refused before the emulator sees it), `reset` (the emulator
    does the work, the connection then drops without an answer) or `mixed`; returns its counts
    so far (`{"requests": n, "failed": {kind: n}, ...}`) and zeroes them."""
    return faults(env, f"?rate={rate}&kind={kind}&seed={seed}")


def faults(env: dict[str, str], query: str = "") -> dict:
    """The proxy's request and failure counts since faults were last set."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to the proxy
    with opener.open(env["https_proxy"] + "/faults" + query, timeout=10) as response:
        return json.loads(response.read())


if __name__ == "__main__":
    proxy = serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    print(proxy.server_address[1], flush=True)
    threading.Event().wait()
