"""Lab guests: small QEMU VMs (Debian cloud kernel + busybox) for tests and demos.

    from sva import lab
    guest = lab.up("demo", scenario="infected")   # boots in a few seconds under TCG
    lab.get("demo").qmp_path                       # what `lab:demo` targets resolve to
    lab.exec_in("demo", "uname -r")                # ExecResult(status, output)
    lab.ps("demo")                                 # the guest's own process list
    lab.down("demo")

What a scenario starts is in `sva.lab.scenarios` (e.g. `scenarios.INFECTED`).
"""

from sva.lab import scenarios
from sva.lab.guest import GuestProcess, LabGuest, down, exec_in, get, list_guests, ps, reset, up
from sva.lab.serial import ExecResult

__all__ = [
    "ExecResult",
    "GuestProcess",
    "LabGuest",
    "down",
    "exec_in",
    "get",
    "list_guests",
    "ps",
    "reset",
    "scenarios",
    "up",
]
