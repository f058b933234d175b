"""The echo upstream over TLS: stack/echo_upstream.py's handler behind a TLS
listener that records the SNI of every handshake, as a managed process.

A provider's HTTPS endpoint, locally: Envoy's TLS cluster (envoy/examples/*.yaml)
connects to `tls_port`, sends its SNI, verifies the certificate this server
presents (`--cert`, a chain signed by a test CA, `--key`) and sends the request,
which the echo handler records and answers exactly like the plain echo upstream.

The harness reads what arrived on a second, plain-HTTP port on loopback (`port`,
so `url`, `received()`, `clear()`, `fail_next()` are EchoUpstream's), sharing the
TLS listener's recorder:

- GET    /_demo/received      what the TLS listener received (echo_upstream.py)
- DELETE /_demo/received      forget it, and every handshake recorded below
- GET    /_tls/handshakes     every TLS handshake, oldest first:
                              {"sni": name or null, "ok": bool, "version": "TLSv1.3"
                              or null, "error": text or null}; a client that refused
                              the certificate shows as "ok": false with its alert
- DELETE /_tls/handshakes     forget the handshakes

Each handshake runs in its connection's own thread, so a client that stalls or
fails one never holds up the others. The handshake is recorded before the request
is read: a connection refused at the handshake leaves a handshake and no request.

Run: python -m stack.tls_upstream --port 18443 --control-port 18444 --cert chain.pem --key key.pem
(from the repository root). Certificates for tests: `make_ca`, `issue` (the
`cryptography` package, imported only by them).
"""

import argparse
import collections
import datetime
import json
import os
import ssl
import sys
import threading
import time
import urllib.request

from stack import echo_upstream, paths
from stack.ports import http_status
from stack.upstream import EchoUpstream

HANDSHAKES_PATH = "/_tls/handshakes"
KEEP_HANDSHAKES = 1000


class Handshakes:
    """The last KEEP_HANDSHAKES TLS handshakes, thread-safe."""

    def __init__(self):
        self._items = collections.deque(maxlen=KEEP_HANDSHAKES)
        self._lock = threading.Lock()

    def add(self, sni, ok, version=None, error=None):
        with self._lock:
            self._items.append({"sni": sni, "ok": ok, "version": version, "error": error,
                                "at": time.time()})

    def all(self):
        with self._lock:
            return list(self._items)

    def clear(self):
        with self._lock:
            self._items.clear()


def tls_server(host, port, context, handshakes, *, quiet=False, keep=echo_upstream.KEEP):
    """echo_upstream's server on host:port, each connection a TLS server handshake
    with `context` (in the connection's thread) recorded in `handshakes`."""
    server = echo_upstream.make_server(host, port, quiet=quiet, keep=keep)
    sni = threading.local()

    def remember_sni(_ssl_socket, server_name, _context):
        sni.name = server_name

    context.sni_callback = remember_sni
    base = type(server)

    class TlsEchoServer(base):
        def finish_request(self, request, client_address):
            sni.name = None
            try:
                connection = context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                handshakes.add(sni.name, False, error=f"{type(exc).__name__}: {exc}")
                if not quiet:
                    sys.stderr.write(f"tls-upstream: handshake failed (sni {sni.name!r}): {exc}\n")
                return
            handshakes.add(sni.name, True, version=connection.version())
            try:
                base.finish_request(self, connection, client_address)
            finally:
                connection.close()

    # Same server, same attributes: only the per-connection step changes.
    server.__class__ = TlsEchoServer
    return server


def control_server(host, port, tls, handshakes):
    """A plain-HTTP server on host:port sharing `tls`'s recorder, plus /_tls/handshakes."""
    base = tls.RequestHandlerClass

    class ControlHandler(base):
        def handle_control(self):
            path = self.path.split("?", 1)[0]
            if path == HANDSHAKES_PATH:
                self.read_body()
                if self.command == "GET":
                    return self.send_json(200, {"handshakes": handshakes.all()})
                if self.command == "DELETE":
                    handshakes.clear()
                    return self.send_json(200, {"cleared": True})
                return self.send_json(405, echo_upstream.openai_error("use GET or DELETE"))
            if path == echo_upstream.DEMO_PATH and self.command == "DELETE":
                handshakes.clear()
            return base.handle_any(self)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = handle_control

    server = echo_upstream.make_server(host, port, quiet=tls.quiet)
    server.RequestHandlerClass = ControlHandler
    return server


def server_context(cert, key):
    """A TLS 1.2+ server context presenting the chain in `cert` with `key`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def main(argv=None):
    parser = argparse.ArgumentParser(description="Echo LLM upstream over TLS, recording SNI")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="TLS port")
    parser.add_argument("--control-port", type=int, required=True, help="plain HTTP port of /_demo/ and /_tls/")
    parser.add_argument("--cert", required=True, help="PEM: the server certificate, then its chain")
    parser.add_argument("--key", required=True, help="PEM: the server key")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--keep", type=int, default=echo_upstream.KEEP)
    args = parser.parse_args(argv)
    handshakes = Handshakes()
    tls = tls_server(args.host, args.port, server_context(args.cert, args.key), handshakes,
                     quiet=args.quiet, keep=args.keep)
    control = control_server(args.host, args.control_port, tls, handshakes)
    threading.Thread(target=tls.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    sys.stderr.write(f"tls-upstream: TLS on {args.host}:{args.port}, "
                     f"control on http://{args.host}:{args.control_port}\n")
    sys.stderr.flush()
    try:
        control.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        tls.shutdown()
        tls.server_close()
        control.server_close()


# -- the managed process ----------------------------------------------------------


class TlsEchoUpstream(EchoUpstream):
    """The echo upstream over TLS on 127.0.0.1:`tls_port`, inspected over plain HTTP
    on 127.0.0.1:`port` (so `received()`, `clear()`, `last()`, `fail_next()` are
    EchoUpstream's; `clear()` forgets the handshakes too).

    `cert`: PEM file of the server certificate followed by its chain; `key`: its key.
    Ready when the control port answers: both listeners are bound before either
    serves, and no probe touches the TLS port (it would be a handshake on record).
    """

    name = "tls-upstream"

    def __init__(self, directory, port, *, tls_port, cert, key, **kwargs):
        super().__init__(directory, port, **kwargs)
        self.tls_port = tls_port
        self.cert = cert
        self.key = key

    def command(self):
        argv = [paths.python(), "-m", "stack.tls_upstream", "--host", "127.0.0.1", "--port", self.tls_port,
                "--control-port", self.port, "--cert", self.cert, "--key", self.key]
        if self.keep is not None:
            argv += ["--keep", self.keep]
        return argv

    def environment(self):
        env = super().environment()
        env["PYTHONPATH"] = str(paths.REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def other_ports(self):
        return [self.tls_port]

    def ready(self):
        return http_status(self.health_url()) == 200

    def handshakes(self):
        """Every recorded TLS handshake, oldest first (dicts: sni, ok, version, error)."""
        with urllib.request.urlopen(self.url + HANDSHAKES_PATH, timeout=5) as response:
            return json.load(response)["handshakes"]


# -- certificates for tests -------------------------------------------------------


class Authority:
    """A certificate authority of a test: its key, its certificate, its PEM."""

    def __init__(self, key, certificate):
        self.key = key
        self.certificate = certificate

    @property
    def pem(self):
        from cryptography.hazmat.primitives.serialization import Encoding

        return self.certificate.public_bytes(Encoding.PEM)

    def write(self, path):
        """The CA certificate as a PEM file (what a client trusts); returns the path."""
        path.write_bytes(self.pem)
        return path


def _name(common_name):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name="ibex test CA"):
    """A new self-signed CA (EC P-256), valid from an hour ago for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, certificate)


def issue(ca, dns_names, cert_path, key_path):
    """A server certificate from `ca` for `dns_names` (SANs; wildcards allowed),
    written as cert_path (leaf then CA) and key_path (PEM, mode 0600)."""

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in dns_names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM) + ca.pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return cert_path, key_path


def _stop_on_sigterm(_signum, _frame):
    """SIGTERM ends serve_forever the same way Ctrl-C does."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    main()
