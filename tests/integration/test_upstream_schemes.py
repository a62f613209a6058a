"""Upstream schemes end to end: a Caddy inside an instance serves HTTPS (a self-signed
certificate) and h2c; the labels `upstream.scheme` and `upstream.tls_insecure` make the
edge Caddy reach it over TLS and over cleartext HTTP/2."""

from __future__ import annotations

from pathlib import Path

import pytest

from incus_caddyfile.caddy import find_caddy

from ..helpers import skip_or_fail
from .conftest import (
    LABELS,
    Caddy,
    Lab,
    incus,
    labels,
    render_and_start,
    run_cli,
    self_signed_cert,
    wait_for,
)

pytestmark = pytest.mark.integration

UPSTREAM = """{
	admin off
	auto_https disable_redirects
	servers {
		protocols h1 h2 h2c
	}
}

https://:8443 {
	tls /etc/caddy/cert.pem /etc/caddy/key.pem
	respond "tls upstream {http.request.proto}"
}

http://:8081 {
	respond "h2c upstream {http.request.proto}"
}
"""


def start_upstream_caddy(lab: Lab, project: str, name: str, workdir: Path) -> None:
    exe = find_caddy()
    if exe is None:
        skip_or_fail("no caddy executable to put into the instance")
    self_signed_cert(workdir / "key.pem", workdir / "cert.pem", "upstream")
    (workdir / "Upstream").write_text(UPSTREAM)
    lab.exec(project, name, "mkdir -p /etc/caddy")
    for src, dst, mode in [
        (exe, "/bin/caddy", "0755"),
        (workdir / "key.pem", "/etc/caddy/key.pem", "0600"),
        (workdir / "cert.pem", "/etc/caddy/cert.pem", "0644"),
        (workdir / "Upstream", "/etc/caddy/Caddyfile", "0644"),
    ]:
        incus("file", "push", str(src), f"{name}{dst}", "--mode", mode, "--project", project)
    lab.exec(
        project,
        name,
        "HOME=/tmp XDG_DATA_HOME=/tmp XDG_CONFIG_HOME=/tmp busybox setsid"
        " caddy run --config /etc/caddy/Caddyfile > /tmp/caddy.log 2>&1 < /dev/null &",
    )


def test_https_and_h2c_upstreams(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    project = lab.project()
    tag = project[-4:]
    tls, h2c = f"tls-{tag}", f"h2c-{tag}"
    lab.launch(
        project,
        tls,
        {
            **labels(f"{tls}.localhost", 8443),
            LABELS + "upstream.scheme": "https",
            LABELS + "upstream.tls_insecure": "true",
        },
    )
    lab.launch(
        project, h2c, {**labels(f"{h2c}.localhost", 8081), LABELS + "upstream.scheme": "h2c"}
    )
    for name in (tls, h2c):
        lab.address(project, name)
        start_upstream_caddy(lab, project, name, tmp_path)

    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)

    assert "tls upstream HTTP/2.0" in caddy.wait_body(f"{tls}.localhost", "tls upstream")
    assert "h2c upstream HTTP/2.0" in caddy.wait_body(f"{h2c}.localhost", "h2c upstream")

    # without tls_insecure the self-signed certificate is refused: the flag is what lets it in
    lab.set(project, tls, **{LABELS + "upstream.tls_insecure": "false"})
    result = run_cli("render", "-o", out, *caddy.render_args)
    assert result.returncode == 0, result.stderr
    assert wait_for(lambda: caddy.get(f"{tls}.localhost")[0] == 502, 10)
