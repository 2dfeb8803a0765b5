"""vagrant/Vagrantfile: checked offline with ``vagrant validate`` (no hypervisor here).

With vagrant-libvirt installed the libvirt provider blocks are validated too (unknown settings
are errors); VirtualBox blocks can only be checked with ``--ignore-provider`` without VirtualBox.
The provisioning scripts are checked with ``bash -n``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VAGRANT_DIR = REPO / "vagrant"
APT_PACKAGES = ("vagrant", "vagrant-libvirt")
VALIDATE_TIMEOUT = 60.0


def _ensure_vagrant() -> str | None:
    """Install Debian's vagrant if missing; return a skip reason if that is impossible."""
    if shutil.which("vagrant"):
        return None
    if os.geteuid() != 0:
        return "vagrant is not installed and installing it needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0 or not shutil.which("vagrant"):
        return f"vagrant cannot be installed: {proc.stderr.strip()[-300:]}"
    return None


def _has_libvirt_plugin() -> bool:
    return Path("/usr/share/vagrant-plugins/plugins.d/vagrant-libvirt.json").exists()


@pytest.fixture(scope="module")
def vagrant_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    reason = _ensure_vagrant()
    if reason:
        pytest.skip(reason)
    # Vagrant writes its machine state (.vagrant/) next to the Vagrantfile unless told otherwise.
    dot = tmp_path_factory.mktemp("vagrant-dot")
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": str(dot), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    env.pop("TPROXY_DEB", None)
    yield env


def _validate(directory: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["vagrant", "validate", *args],
        cwd=directory,
        env={**env, "VAGRANT_CWD": str(directory)},
        capture_output=True,
        text=True,
        timeout=VALIDATE_TIMEOUT,
        check=False,
    )


def test_vagrantfile_validates_for_every_provider(vagrant_env: dict[str, str]) -> None:
    proc = _validate(VAGRANT_DIR, vagrant_env, "--ignore-provider")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for machine in ("client", "gateway", "origin"):
        assert f"{machine}:" in proc.stdout


def test_libvirt_provider_settings_validate(vagrant_env: dict[str, str]) -> None:
    if not _has_libvirt_plugin():
        pytest.skip("vagrant-libvirt is not installed: libvirt settings cannot be checked")
    proc = _validate(VAGRANT_DIR, {**vagrant_env, "VAGRANT_DEFAULT_PROVIDER": "libvirt"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gateway_uploads_the_package_when_one_exists(
    vagrant_env: dict[str, str], tmp_path: Path
) -> None:
    deb = tmp_path / "tproxy_0.0.0_amd64.deb"
    deb.write_bytes(b"!<arch>\n")
    proc = _validate(VAGRANT_DIR, {**vagrant_env, "TPROXY_DEB": str(deb)}, "--ignore-provider")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_validate_rejects_a_broken_vagrantfile(vagrant_env: dict[str, str], tmp_path: Path) -> None:
    """The check above can fail: a misspelt setting in a copy of the Vagrantfile is refused."""
    copy = tmp_path / "vagrant"
    shutil.copytree(VAGRANT_DIR, copy)
    text = (copy / "Vagrantfile").read_text()
    assert 'm.vm.hostname = "gateway"' in text
    (copy / "Vagrantfile").write_text(
        text.replace(
            'm.vm.hostname = "gateway"', 'm.vm.hostname = "gateway"\n    m.vm.hostnam = "x"'
        )
    )
    proc = _validate(copy, vagrant_env, "--ignore-provider")
    assert proc.returncode != 0
    assert "hostnam" in proc.stdout + proc.stderr


def test_provisioning_scripts_are_valid_bash() -> None:
    scripts = sorted((VAGRANT_DIR / "provision").glob("*.sh"))
    assert {p.name for p in scripts} >= {"common.sh", "client.sh", "gateway.sh", "origin.sh"}
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
