"""systemd/herald.service passes `systemd-analyze verify`, and systemd/install --dry-run works.

`verify` checks that ExecStart's binary exists and is executable, so the unit is verified as
installed: a copy with /usr/local/bin/herald replaced by the binary under test. Everything else
(directives, their values, the [Install] section) is the file as shipped.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "herald.service"
INSTALL = ROOT / "systemd" / "install"
HERALD = Path(os.environ.get("HERALD_BIN", ROOT / "target" / "debug" / "herald")).resolve()

ANALYZE = shutil.which("systemd-analyze")


def unit_text() -> str:
    return UNIT.read_text()


def analyze_verify(unit: str, cwd: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` of a unit file."""
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", unit], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_unit_has_the_required_directives():
    text = unit_text()
    lines = {l.strip() for l in text.splitlines() if l.strip() and not l.startswith("#")}
    for want in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "ExecStart=/usr/local/bin/herald serve --config /etc/herald/herald.toml --log-json",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "User=herald",
        "StateDirectory=herald",
        "ConfigurationDirectory=herald",
        "LimitNOFILE=1048576",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "MemoryDenyWriteExecute=yes",
    ]:
        assert want in lines, f"missing `{want}`"
    # No syscall filter that would block io_uring.
    assert not any(l.startswith("SystemCallFilter=") for l in lines)
    # TimeoutStopSec above the default drain time (5 s) with margin.
    stop = next(l for l in lines if l.startswith("TimeoutStopSec="))
    assert int(stop.split("=")[1].rstrip("s")) >= 15


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt: systemd)")
def test_systemd_analyze_verify(tmp_path):
    assert HERALD.exists(), f"build the binary first: {HERALD}"
    unit = tmp_path / "herald.service"
    text = unit_text().replace("/usr/local/bin/herald", str(HERALD))
    assert str(HERALD) in text
    unit.write_text(text)
    r = analyze_verify(str(unit), tmp_path)
    # Messages about *this* unit are failures; the host's own units are not our business.
    ours = [l for l in (r.stdout + r.stderr).splitlines() if "herald.service" in l]
    assert r.returncode == 0 and not ours, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt: systemd)")
def test_verify_catches_a_broken_unit(tmp_path):
    """The check above is meaningful: a bad directive value makes verify fail."""
    unit = tmp_path / "herald.service"
    text = unit_text().replace("/usr/local/bin/herald", str(HERALD))
    unit.write_text(text.replace("Type=notify", "Type=bogus"))
    r = analyze_verify(str(unit), tmp_path)
    assert "herald.service" in r.stdout + r.stderr


def test_install_dry_run_changes_nothing(tmp_path):
    r = subprocess.run(
        [str(INSTALL), "--dry-run", "--binary", str(HERALD)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "[dry-run] useradd" in out or "user herald exists" in out, out
    assert "[dry-run] systemctl daemon-reload" in out, out
    assert "/etc/systemd/system/herald.service" in out, out
    assert "+ " not in out, f"a dry run ran something:\n{out}"


def test_install_into_a_root(tmp_path):
    """A real install into a staging root: files in place, a valid generated config, and a
    second run keeps that config."""
    cmd = [str(INSTALL), "--binary", str(HERALD), "--root", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.access(tmp_path / "usr/local/bin/herald", os.X_OK)
    assert (tmp_path / "etc/systemd/system/herald.service").read_text() == unit_text()
    assert (tmp_path / "etc/systemd/system/herald@.service").read_text() == (
        ROOT / "systemd" / "herald@.service").read_text()
    conf = tmp_path / "etc/herald/herald.toml"
    assert oct(conf.stat().st_mode & 0o777) == "0o640"
    c = subprocess.run(
        [str(HERALD), "check-config", "--config", str(conf)], capture_output=True, text=True
    )
    assert c.returncode == 0, c.stdout + c.stderr
    before = conf.read_text()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exists: kept" in r.stdout
    assert conf.read_text() == before


NODE_UNIT = ROOT / "systemd" / "herald@.service"
#: The directives a cluster node's instance sets its own way.
PER_NODE = ("Description=", "After=", "Wants=", "ExecStart=", "StateDirectory=")


def directives(text: str) -> set[str]:
    return {l.strip() for l in text.splitlines() if l.strip() and not l.startswith("#")}


def test_node_template_is_the_unit_with_a_config_and_state_per_node():
    ours, node = directives(unit_text()), directives(NODE_UNIT.read_text())
    same = lambda d: {l for l in d if not l.startswith(PER_NODE)}
    assert same(ours) == same(node), f"only in herald.service: {same(ours) - same(node)}; only in herald@.service: {same(node) - same(ours)}"
    assert "ExecStart=/usr/local/bin/herald serve --config /etc/herald/%i.toml --log-json" in node
    assert "StateDirectory=herald/%i" in node
    assert "After=network-online.target redis-server.service" in node


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt: systemd)")
def test_node_template_verifies(tmp_path):
    assert HERALD.exists(), f"build the binary first: {HERALD}"
    (tmp_path / "herald@.service").write_text(
        NODE_UNIT.read_text().replace("/usr/local/bin/herald", str(HERALD)))
    r = analyze_verify(str(tmp_path / "herald@a.service"), tmp_path)
    ours = [l for l in (r.stdout + r.stderr).splitlines() if "herald@" in l]
    assert r.returncode == 0 and not ours, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
