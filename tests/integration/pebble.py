"""A real ACME server on loopback: Pebble (Debian package `pebble`) with its DNS test server
answering every name with 127.0.0.1 (see shared/notes/lab-recipes.md, "Real ACME (Pebble)").

Ports are picked free here, so sessions sharing the machine do not collide. Pebble makes a new
issuing root at every start: `root` is fetched once it is up. `orders()` counts the new-order
requests Pebble received (its own log)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path

from ..harness import HarnessError, free_port, stop_process, wait_for


def _listener_certificate(workdir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a 127.0.0.1/localhost certificate for Pebble's HTTPS listeners (the
    Debian package ships none)."""
    ca_key, ca, key, csr, ext, cert = (
        workdir / n
        for n in (
            "ca.key",
            "ca.pem",
            "listener.key",
            "listener.csr",
            "listener.ext",
            "listener.pem",
        )
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run = ["openssl", "req"]
    subprocess.run(
        [*run, "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
         "-subj", "/CN=Pebble listener test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    subprocess.run(
        [*run, *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n"
    )
    subprocess.run(
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return ca, cert, key


class Pebble:
    """Pebble and pebble-challtestsrv as processes, until `stop`."""

    def __init__(self, workdir: Path) -> None:
        for tool in ("pebble", "pebble-challtestsrv", "openssl"):
            if shutil.which(tool) is None:
                raise HarnessError(f"{tool} is not installed (apt-get install pebble openssl)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.acme_port, self.mgmt_port = free_port(), free_port()
        self.http_port, self.tls_port = free_port(), free_port()  # Caddy's http/https ports
        self.dns_port, self.chall_mgmt_port = free_port(), free_port()
        self.listener_ca, cert, key = _listener_certificate(workdir)
        config = workdir / "pebble.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.acme_port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(cert), "privateKey": str(key),
            "httpPort": self.http_port, "tlsPort": self.tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
        }}))  # fmt: skip
        self.log = workdir / "pebble.log"
        with (workdir / "challtestsrv.log").open("ab") as out:
            self.dns = subprocess.Popen(
                ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                 "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "",
                 "-tlsalpn01", "", "-management", f"127.0.0.1:{self.chall_mgmt_port}"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
               "PEBBLE_AUTHZREUSE": "0"}  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        self.context = ssl.create_default_context(cafile=str(self.listener_ca))
        if not wait_for(self._up, 20, interval=0.2):
            self.stop()
            raise HarnessError(f"Pebble did not start: {self.log.read_text()[-2000:]}")
        self.root = workdir / "pebble-root.pem"  # the issuing root, new at every start
        self.root.write_bytes(self._get(f"https://127.0.0.1:{self.mgmt_port}/roots/0"))

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    def _get(self, url: str) -> bytes:
        with urllib.request.urlopen(url, context=self.context, timeout=5) as response:
            return bytes(response.read())

    def _up(self) -> bool:
        try:
            self._get(self.directory)
            return True
        except OSError:
            return False

    def caddy_options(self, storage: Path) -> list[str]:
        """Global options that make Caddy use this Pebble, on its validation ports."""
        return [
            f"storage file_system {storage}",
            "default_bind 127.0.0.1",
            f"http_port {self.http_port}",
            f"https_port {self.tls_port}",
            f"acme_ca {self.directory}",
            f"acme_ca_root {self.listener_ca}",
            "skip_install_trust",
            "ocsp_stapling off",
        ]

    def orders(self) -> int:
        """New-order requests Pebble has received."""
        return self.log.read_text(errors="replace").count("POST /order-plz")

    def stop(self) -> None:
        stop_process(self.proc)
        stop_process(self.dns)


def https_get(port: int, host: str, root: Path, timeout: float = 30.0) -> tuple[bool, str]:
    """A TLS handshake with this SNI, the certificate verified against `root`, then GET /.
    (True, the response) or (False, why the handshake or request failed)."""
    context = ssl.create_default_context(cafile=str(root))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            tls.sendall(request.encode())
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
            return True, b"".join(chunks).decode("utf-8", "replace")
    except (OSError, ssl.SSLError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
