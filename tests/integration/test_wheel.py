"""A non-editable install ships the default template: build the wheel, install it into a fresh
venv and render against the real lab from outside the source tree."""

from __future__ import annotations

import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT, Lab

pytestmark = pytest.mark.integration


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_wheel_in_fresh_venv_renders(lab: Lab, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, ROOT, cwd=tmp_path)
    [wheel] = dist.glob("incus_caddyfile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "incus_caddyfile/templates/Caddyfile.j2" in names
    assert "incus_caddyfile/templates/status.html.j2" in names  # the status page

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    run(venv / "bin" / "pip", "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    # Dependencies come from the test environment; the package itself only from the wheel.
    [venv_site] = (venv / "lib").glob("python3*/site-packages")
    (venv_site / "zz-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    where = run(
        venv / "bin" / "python",
        "-c",
        "import incus_caddyfile.render as r; print(r.__file__, r.default_template_dir())",
        cwd=tmp_path,
    ).stdout
    assert where.startswith(str(venv_site)), where

    project, name = lab.labelled("whl")
    address = lab.address(project, name)
    out = run(venv / "bin" / "incus-caddyfile", "render", cwd=tmp_path).stdout
    assert f"{name}.localhost {{\n\treverse_proxy {address}:80 {{\n" in out
