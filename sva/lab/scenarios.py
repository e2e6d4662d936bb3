"""What runs inside a lab guest, as data: the ground truth that detector tests check against.

The init script (sva.lab.initscript) starts these processes; tests and demos read the
expectations from here instead of repeating names and strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from sva.errors import LabError

# The YARA rule signatures/test/lab_marker.yar matches exactly this string. The guest builds
# it at run time from MARKER_PIECES, so it is in process memory but never in the initramfs.
MARKER_RULE = "SVA_Lab_Marker"
MARKER_PIECES = ("SVA-LAB", "-MARK", "ER-8966", "aa98e5", "4f8b26")
MARKER = "".join(MARKER_PIECES)
MARKER_ENV = "SVA_LAB_TOKEN"  # environment variable of the marker holder that carries it
MARKER_RULE_FILE = "signatures/test/lab_marker.yar"  # relative to the repository root

# QEMU user networking forwards this guest address to a file in the lab's runtime dir
# (guestfwd), so the reverse shell has a live TCP connection that never leaves QEMU.
C2_ADDRESS = ("10.0.2.100", 4444)


@dataclass(frozen=True)
class ExpectedProcess:
    """One process a scenario starts, as the guest's own `ps` shows it."""

    role: str  # what a detector should call it
    comm: str  # /proc/PID/comm (at most 15 characters)
    parent_comm: str  # comm of its parent process
    args_contain: str = ""  # a substring of its command line
    args_exact: str = ""  # its whole command line (arguments joined by spaces), if set
    holds_marker: bool = False  # MARKER is in its memory (environment)
    description: str = ""

    def matches(self, comm: str, args: str) -> bool:
        """Whether a process with this comm and command line is this expected one."""
        if comm != self.comm or self.args_contain not in args:
            return False
        return not self.args_exact or args.strip() == self.args_exact


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    processes: tuple[ExpectedProcess, ...] = ()
    marker: str | None = None
    c2_address: tuple[str, int] | None = None

    @property
    def comms(self) -> tuple[str, ...]:
        return tuple(p.comm for p in self.processes)

    def process(self, role: str) -> ExpectedProcess:
        for p in self.processes:
            if p.role == role:
                return p
        raise KeyError(f"scenario {self.name} has no process with role {role!r}")


CLEAN = Scenario(name="clean", description="only init and a shell on the serial console")

INFECTED = Scenario(
    name="infected",
    description="a memory-resident marker, a coin-miner look-alike and a reverse shell",
    processes=(
        ExpectedProcess(
            role="marker_holder",
            comm="implant",
            parent_comm="init",
            args_contain="/usr/lib/sva-lab/implant",
            holds_marker=True,
            description=f"a shell script whose environment variable {MARKER_ENV} holds the marker string",
        ),
        ExpectedProcess(
            role="coin_miner",
            comm="xmrig",
            parent_comm="init",
            args_contain="stratum+tcp://",
            description="a sleeping shell script dropped as /tmp/xmrig, with miner-like arguments",
        ),
        ExpectedProcess(
            role="reverse_shell",
            comm="nc",
            parent_comm="sh",
            args_contain=f"{C2_ADDRESS[0]} {C2_ADDRESS[1]}",
            description="busybox nc piping an interactive /bin/sh -i to the C2 address through a fifo",
        ),
        ExpectedProcess(
            role="reverse_shell_sh",
            comm="sh",
            parent_comm="sh",
            args_exact="/bin/sh -i",
            description="the interactive shell whose input and output go through nc",
        ),
        ExpectedProcess(
            role="reverse_shell_loop",
            comm="sh",
            parent_comm="init",
            args_contain="mkfifo /tmp/f",
            description="the `sh -c` loop that restarts the reverse shell pipeline every 5 s",
        ),
    ),
    marker=MARKER,
    c2_address=C2_ADDRESS,
)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (CLEAN, INFECTED)}


def get(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise LabError(f"unknown lab scenario {name!r}; choose one of {', '.join(SCENARIOS)}") from None
