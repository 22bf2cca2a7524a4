"""tuning/herald-tune, for real inside a network namespace (net.* sysctls are per netns) and
in --dry-run for the global keys. Never changes the host's own values."""

from __future__ import annotations

import os
import re
import resource
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TUNE = REPO / "tuning" / "herald-tune"
PROFILES = REPO / "tuning" / "profiles"


def _run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)


def _norm(value: str) -> str:
    return " ".join(value.split())


def profile_values(name: str) -> dict[str, str]:
    """key -> value of a profile's 99-herald.conf (the '-' prefix dropped)."""
    values = {}
    for line in (PROFILES / name / "99-herald.conf").read_text().splitlines():
        line = line.split("#", 1)[0]
        m = re.match(r"^\s*-?([A-Za-z0-9_.-]+)\s*=\s*(.*)$", line)
        if m:
            values[m.group(1)] = _norm(m.group(2))
    return values


def limit_nofile(name: str) -> str:
    text = (PROFILES / name / "herald-limits.conf").read_text()
    return re.search(r"^LimitNOFILE=(\d+)$", text, re.M).group(1)


class Netns:
    def __init__(self, name: str):
        self.name = name

    def run(self, *args):
        return _run(["ip", "netns", "exec", self.name, *args])

    def tune(self, *args):
        return self.run(str(TUNE), *args)

    def sysctl(self, key: str) -> str | None:
        """The value in the namespace, or None when the key does not exist there."""
        r = self.run("sysctl", "-n", key)
        return _norm(r.stdout) if r.returncode == 0 else None

    def writable(self, key: str) -> bool:
        path = "/proc/sys/" + key.replace(".", "/")
        r = self.run("stat", "-c", "%A", path)
        return r.returncode == 0 and r.stdout[2] == "w"

    def set(self, key: str, value: str) -> None:
        r = self.run("sysctl", "-q", "-w", f"{key}={value}")
        assert r.returncode == 0, r.stderr


@pytest.fixture
def netns():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    name = f"herald-tune-{secrets.token_hex(4)}"
    r = _run(["ip", "netns", "add", name])
    if r.returncode != 0:
        pytest.skip(f"`ip netns add` not permitted here: {r.stderr.strip()}")
    try:
        yield Netns(name)
    finally:
        _run(["ip", "netns", "delete", name])


def _net_keys(ns: Netns, profile: str) -> dict[str, str]:
    """The profile's net.* keys that exist and are writable in the namespace."""
    keys = {k: v for k, v in profile_values(profile).items() if k.startswith("net.")}
    return {k: v for k, v in keys.items() if ns.sysctl(k) is not None and ns.writable(k)}


def _snapshot(ns: Netns, keys) -> dict[str, str | None]:
    return {k: ns.sysctl(k) for k in keys}


def test_rules_match_profiles():
    """`rules --connections N` derives exactly the values written in c100k and c1m."""
    for profile, n in (("c100k", 100_000), ("c1m", 1_000_000)):
        r = _run([str(TUNE), "rules", "--connections", str(n)])
        assert r.returncode == 0, r.stderr
        derived = dict(_norm(line).split(" = ", 1) for line in r.stdout.splitlines())
        expected = profile_values(profile)
        expected["LimitNOFILE"] = limit_nofile(profile)
        assert derived == expected, (profile, derived, expected)
        limits = (PROFILES / profile / "herald.conf").read_text()
        assert re.search(rf"^herald\s+soft\s+nofile\s+{expected['LimitNOFILE']}$", limits, re.M)
        assert re.search(rf"^herald\s+hard\s+nofile\s+{expected['LimitNOFILE']}$", limits, re.M)
        assert "tcp_tw_recycle" not in expected


def test_profile_values_are_all_commented():
    """Every setting is under a comment (the why and how): the lines above it, skipping
    settings that share the comment, start with '#'."""
    setting = re.compile(r"^\s*-?[a-z]")
    for profile in ("c100k", "c1m"):
        lines = (PROFILES / profile / "99-herald.conf").read_text().splitlines()
        for i, line in enumerate(lines):
            if setting.match(line):
                j = i - 1
                while j >= 0 and setting.match(lines[j]):
                    j -= 1
                assert j >= 0 and lines[j].lstrip().startswith("#"), (profile, line)


def test_apply_then_revert_in_netns(netns, tmp_path):
    state = tmp_path / "state"
    common = ["--only-net", "--root", str(tmp_path), "--state-dir", str(state)]
    keys = _net_keys(netns, "c100k")
    assert {"net.core.somaxconn", "net.ipv4.tcp_rmem", "net.ipv4.tcp_fin_timeout"} <= set(keys)
    # make sure apply has something to change, whatever the namespace defaults are
    netns.set("net.core.somaxconn", "1024")
    netns.set("net.ipv4.tcp_tw_reuse", "2")
    before = _snapshot(netns, keys)

    for _ in range(2):  # twice: the same as once
        r = netns.tune("apply", "--profile", "c100k", *common)
        assert r.returncode == 0, r.stdout + r.stderr
        for key, value in keys.items():
            assert netns.sysctl(key) == value, (key, netns.sysctl(key), value)
    assert "set:" not in r.stdout, r.stdout  # second apply changes nothing
    written = tmp_path / "etc/sysctl.d/99-herald.conf"
    assert written.is_file()
    text = written.read_text()
    assert "fs." not in text.replace("# ", "")
    # --only-net writes no limits files
    assert not (tmp_path / "etc/security").exists()
    assert not (tmp_path / "etc/systemd").exists()

    chk = netns.tune("check", "--profile", "c100k", "--only-net")
    assert chk.returncode == 0, chk.stdout

    for i in range(2):  # twice: the same as once
        r = netns.tune("revert", *common)
        assert r.returncode == 0, r.stdout + r.stderr
        assert _snapshot(netns, keys) == before
        if i == 1:
            assert "nothing to revert" in r.stdout, r.stdout
    assert not written.exists()


def test_revert_restores_previous_file(netns, tmp_path):
    state = tmp_path / "state"
    common = ["--only-net", "--root", str(tmp_path), "--state-dir", str(state)]
    path = tmp_path / "etc/sysctl.d/99-herald.conf"
    path.parent.mkdir(parents=True)
    path.write_text("# an operator's earlier file\nnet.core.somaxconn = 2048\n")
    original = path.read_text()
    r = netns.tune("apply", "--profile", "c1m", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert path.read_text() != original
    assert netns.sysctl("net.core.somaxconn") == "65535"
    r = netns.tune("revert", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert path.read_text() == original


def test_dry_run_changes_nothing(netns, tmp_path):
    state = tmp_path / "state"
    host_global = ["fs.nr_open", "fs.file-max", "net.ipv4.tcp_mem", "net.core.netdev_max_backlog"]
    host_before = {k: _norm(_run(["sysctl", "-n", k]).stdout) for k in host_global}
    # global keys, on the host: the dry run plans them and touches nothing
    r = _run([str(TUNE), "apply", "--profile", "c1m", "--dry-run",
              "--root", str(tmp_path), "--state-dir", str(state)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dry run" in r.stdout
    for key in ("fs.nr_open", "fs.file-max"):
        assert re.search(rf"(would set|unchanged): {re.escape(key)}\b", r.stdout), r.stdout
    assert "would write: " + str(tmp_path / "etc/systemd/system/herald.service.d/herald-limits.conf") in r.stdout
    assert "LimitNOFILE=1048576" in r.stdout
    host_after = {k: _norm(_run(["sysctl", "-n", k]).stdout) for k in host_global}
    assert host_after == host_before
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))

    # net keys in the namespace: dry-run apply and dry-run revert change nothing
    keys = _net_keys(netns, "c100k")
    netns.set("net.core.somaxconn", "1024")
    before = _snapshot(netns, keys)
    common = ["--only-net", "--root", str(tmp_path), "--state-dir", str(state)]
    r = netns.tune("apply", "--profile", "c100k", "--dry-run", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "would set: net.core.somaxconn: 1024 -> 8192" in r.stdout
    assert _snapshot(netns, keys) == before
    assert list(tmp_path.iterdir()) == []
    r = netns.tune("apply", "--profile", "c100k", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    applied = _snapshot(netns, keys)
    r = netns.tune("revert", "--dry-run", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "would restore: net.core.somaxconn: 8192 -> 1024" in r.stdout
    assert _snapshot(netns, keys) == applied
    r = netns.tune("revert", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _snapshot(netns, keys) == before


def test_check_connections(netns, tmp_path):
    # 20,000 connections: needs somaxconn >= 4096, tcp_max_syn_backlog >= 8192, ...
    netns.set("net.core.somaxconn", "128")
    r = netns.tune("check", "--connections", "20000", "--only-net")
    assert r.returncode == 1, r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("net.core.somaxconn"))
    assert row.split()[1:4] == ["128", "4096", "SHORT"], row
    assert not any(line.startswith("fs.") for line in r.stdout.splitlines())

    common = ["--only-net", "--root", str(tmp_path), "--state-dir", str(tmp_path / "state")]
    try:
        r = netns.tune("apply", "--profile", "c100k", *common)
        assert r.returncode == 0, r.stdout + r.stderr
        r = netns.tune("check", "--connections", "20000", "--only-net")
        assert r.returncode == 0, r.stdout
        row = next(line for line in r.stdout.splitlines() if line.startswith("net.core.somaxconn"))
        assert row.split()[1:4] == ["8192", "4096", "OK"], row
    finally:
        netns.tune("revert", *common)
    assert netns.sysctl("net.core.somaxconn") == "128"


def _herald_bin() -> Path:
    return Path(os.environ.get("HERALD_BIN", REPO / "target" / "debug" / "herald")).resolve()


# The rows both tools check: herald check-host's name -> herald-tune's.
SHARED = {
    "RLIMIT_NOFILE (hard)": "LimitNOFILE",
    "fs.nr_open": "fs.nr_open",
    "fs.file-max": "fs.file-max",
    "net.core.somaxconn": "net.core.somaxconn",
}


def _compare(tmp_path, connections: int):
    """Runs both checks for `connections` and returns their shared rows, side by side. The
    descriptor limit herald-tune reads (LimitNOFILE of herald.service) is staged under --root
    as this process's hard limit, which check-host reads."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    dropin = tmp_path / "etc/systemd/system/herald.service.d/herald-limits.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(f"[Service]\nLimitNOFILE={hard}\n")
    host = _run([str(_herald_bin()), "check-host", "--connections", str(connections)])
    tune = _run([str(TUNE), "check", "--connections", str(connections), "--root", str(tmp_path)])
    assert host.returncode in (0, 1) and tune.returncode in (0, 1), host.stderr + tune.stderr
    hrows = {}
    for line in host.stdout.splitlines():
        for name in SHARED:
            if line.startswith(name + " "):
                fields = line[len(name):].split()
                hrows[name] = (fields[0], fields[1], fields[2].upper())
    trows = {}
    for line in tune.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] in SHARED.values():
            trows[fields[0]] = (fields[1], fields[2], fields[3].upper())
    return host, tune, hrows, trows


@pytest.mark.parametrize("connections", [1000, 19_000, 50_000, 100_000, 1_000_000])
def test_check_host_and_tune_check_agree(tmp_path, connections):
    """`herald check-host` and `herald-tune check` give the same needed value and verdict for
    every row they share, and a value at or above the need is OK in both."""
    host, tune, hrows, trows = _compare(tmp_path, connections)
    assert set(hrows) == set(SHARED), host.stdout
    assert set(trows) == set(SHARED.values()), tune.stdout
    for hname, tname in SHARED.items():
        hcur, hneed, hstatus = hrows[hname]
        tcur, tneed, tstatus = trows[tname]
        assert hcur == tcur, (hname, host.stdout, tune.stdout)
        assert hneed == tneed, (hname, host.stdout, tune.stdout)
        assert hstatus == tstatus, (hname, host.stdout, tune.stdout)
        assert hstatus == ("OK" if int(hcur) >= int(hneed) else "SHORT"), (hname, host.stdout)
    if all(v[2] == "OK" for v in hrows.values()):
        assert host.returncode == 0, host.stdout


def test_tune_check_reports_advice_keys_without_failing(netns, tmp_path):
    """Keys that are advice rather than capacity (buffer sizes, tcp_tw_reuse,
    tcp_fin_timeout, the port range) are DIFFERS, never SHORT, whichever side they differ on;
    a capacity key above its need is OK."""
    netns.set("net.core.somaxconn", "65535")
    netns.set("net.ipv4.tcp_max_syn_backlog", "65536")
    netns.set("net.ipv4.tcp_fin_timeout", "60")
    netns.set("net.ipv4.tcp_tw_reuse", "2")
    netns.set("net.ipv4.tcp_rmem", "4096 131072 6291456")
    netns.set("net.ipv4.ip_local_port_range", "32768 60999")
    r = netns.tune("check", "--connections", "20000", "--only-net")
    rows = {line.split()[0]: line.split()[-1] for line in r.stdout.splitlines()[1:] if line.strip()}
    assert rows["net.core.somaxconn"] == "OK", r.stdout
    assert rows["net.ipv4.tcp_max_syn_backlog"] == "OK", r.stdout
    for key in ("net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_tw_reuse", "net.ipv4.tcp_rmem",
                "net.ipv4.ip_local_port_range"):
        assert rows[key] == "DIFFERS", (key, r.stdout)
    assert "SHORT" not in r.stdout, r.stdout
    assert r.returncode == 0, r.stdout


def test_usage_errors():
    assert _run([str(TUNE), "check"]).returncode == 2
    assert _run([str(TUNE), "apply", "--profile", "nope", "--dry-run"]).returncode == 2
    assert _run([str(TUNE), "check", "--connections", "x"]).returncode == 2
    assert _run([str(TUNE), "frobnicate"]).returncode == 2
