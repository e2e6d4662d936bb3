"""appliance/sysctl.d/90-sva.conf: well-formed, every key known to the kernels it targets,
and its network settings applied for real in a throwaway network namespace."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from sva import lab
from sva.lab import LabGuest

CONF = Path(__file__).resolve().parents[2] / "appliance" / "sysctl.d" / "90-sva.conf"
# Optional keys Debian 12's kernel (6.1) does not have yet; any other key must exist there.
NEWER_THAN_DEBIAN_12 = {"kernel.io_uring_disabled"}
_KEY = re.compile(r"^(-?)([a-z0-9_]+(?:\.[a-z0-9_]+)+)\s*=\s*(-?\d+)$")


@dataclass(frozen=True)
class Setting:
    key: str
    value: int
    optional: bool  # "-key": systemd-sysctl skips it when the kernel lacks it
    line: int

    @property
    def proc_path(self) -> str:
        return "/proc/sys/" + self.key.replace(".", "/")


def settings() -> list[Setting]:
    out: list[Setting] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(CONF.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        m = _KEY.match(line)
        assert m, f"{CONF}:{n}: not 'key = integer': {raw!r}"
        assert m[2] not in seen, f"{CONF}:{n}: {m[2]} already set on line {seen[m[2]]}"
        seen[m[2]] = n
        out.append(Setting(m[2], int(m[3]), bool(m[1]), n))
    return out


def test_file_is_well_formed_and_covers_the_promised_hardening() -> None:
    keys = {s.key for s in settings()}
    for must in ("kernel.kptr_restrict", "kernel.dmesg_restrict", "kernel.unprivileged_bpf_disabled",
                 "kernel.yama.ptrace_scope", "fs.protected_symlinks", "fs.protected_hardlinks",
                 "fs.protected_fifos", "fs.protected_regular", "net.ipv4.conf.all.rp_filter",
                 "net.ipv4.conf.all.accept_redirects", "net.ipv6.conf.all.accept_redirects",
                 "net.ipv4.conf.all.send_redirects", "net.ipv4.conf.all.accept_source_route",
                 "net.ipv4.ip_forward"):  # fmt: skip
        assert must in keys, must


def test_mandatory_keys_exist_on_this_kernel() -> None:
    missing = [f"{CONF}:{s.line}: {s.key}" for s in settings() if not s.optional and not os.path.exists(s.proc_path)]
    assert not missing, "keys without '-' must exist on every kernel we run on:\n" + "\n".join(missing)


def test_every_key_exists_on_debian_12s_kernel(lab_guest: LabGuest) -> None:
    """The lab guest runs Debian 12's cloud kernel, the appliance's kernel: ask it (read only)."""
    # A key 6.1 lacks is the control: the probe must report it, or it proves nothing.
    control = "/proc/sys/kernel/io_uring_disabled"
    wanted = [s for s in settings() if s.key not in NEWER_THAN_DEBIAN_12]
    script = "; ".join(f"[ -e {s.proc_path} ] || echo MISSING {s.key}" for s in wanted)
    script += f"; [ -e {control} ] || echo CONTROL-MISSING; echo done"
    r = lab.exec_in(lab_guest.name, script, timeout=30)
    assert r.status == 0 and "done" in r.output, r.output
    assert "CONTROL-MISSING" in r.output, "the guest kernel is not Debian 12's 6.1, or the probe is broken"
    assert "MISSING " not in r.output, r.output


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and ip")
def test_network_settings_apply_in_a_network_namespace() -> None:
    # net.ipv4.* / net.ipv6.* in this file are per network namespace: apply them there, not
    # on the host, and read them back. (net.core.bpf_jit_harden is global: existence only.)
    net = [s for s in settings() if s.key.startswith(("net.ipv4.", "net.ipv6."))]
    assert len(net) >= 20
    ns = f"svasysctl{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        writes = "\n".join(f"printf %s {s.value} > {s.proc_path} || echo FAILED {s.key}" for s in net)
        reads = "\n".join(f"echo {s.key}=$(cat {s.proc_path})" for s in net)
        p = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", writes + "\n" + reads],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        assert "FAILED" not in p.stdout, p.stdout + p.stderr
        got = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
        assert got == {s.key: str(s.value) for s in net}
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
