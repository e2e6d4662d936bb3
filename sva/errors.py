"""One exception hierarchy for sva.

Every error names its source (a target, a file, an address) so the CLI can print one
clear line. Library code raises these; only the CLI turns them into exit statuses.
"""

from __future__ import annotations


class SvaError(Exception):
    """Root of all errors sva reports to a user."""


class ConfigError(SvaError):
    """A bad configuration value or command-line argument."""


class TargetError(SvaError):
    """A VMI target cannot be opened or used (bad spec, missing socket, wrong options)."""

    def __init__(self, target: str, message: str) -> None:
        super().__init__(f"{target}: {message}")
        self.target = target
        self.reason = message


class QmpError(TargetError):
    """The QEMU monitor failed, refused a command, or went away."""


class MemoryAccessError(SvaError):
    """A guest-physical read outside guest RAM, or through a vanished mapping."""

    def __init__(self, gpa: int, size: int, message: str) -> None:
        super().__init__(f"guest-physical 0x{gpa:x}+0x{size:x}: {message}")
        self.gpa = gpa
        self.size = size


class SnapshotFormatError(SvaError):
    """A memory snapshot file is truncated, corrupt or of an unknown format."""

    def __init__(self, path: str, message: str, offset: int | None = None) -> None:
        where = f"{path}" if offset is None else f"{path} at offset 0x{offset:x}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.offset = offset


class LabError(SvaError):
    """A lab guest could not be built, started, reached or stopped."""


class SymbolsError(SvaError):
    """Kernel type or symbol data (BTF, a kernel image) is missing, corrupt or unusable."""

    def __init__(self, source: str, message: str, offset: int | None = None) -> None:
        where = source if offset is None else f"{source} at offset 0x{offset:x}"
        super().__init__(f"{where}: {message}")
        self.source = source
        self.offset = offset
        self.reason = message


class BusError(SvaError):
    """The alert bus cannot journal, publish, authenticate or replay (names the journal, key or endpoint)."""


class LocatedError(SvaError):
    """A problem in a data file, located: prints as `file:line: what is wrong` (or `file: …`).

    `errors` holds every problem found in the same load (this one first).
    """

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.reason = message
        self.errors: tuple[LocatedError, ...] = (self,)


class RulesError(LocatedError):
    """A rules file is invalid: prints as `file:line: what is wrong`.

    `errors` holds every problem found in the same load (this one first), so a checker can
    report them all at once.
    """


class DetectorError(SvaError):
    """A detector cannot be loaded, or broke its contract (names the detector)."""

    def __init__(self, detector: str, message: str) -> None:
        super().__init__(f"detector {detector}: {message}")
        self.detector = detector
        self.reason = message


class SignatureError(LocatedError):
    """A signature (YARA rule) file cannot be loaded: prints as `file:line: what is wrong`.

    `errors` holds every problem found in the same load (this one first).
    """


class CaptureError(SvaError):
    """A packet source cannot be opened or read (names the source: interface, socket, file)."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.reason = message


class BundleError(SvaError):
    """A signature bundle or feed is refused (names the bundle, file or URL).

    `kind` is the machine-readable reason (a `sva.sigs.model.RejectReason` value:
    `bad-signature`, `not-newer`, `yara-error`, …); the text says what exactly is wrong.
    """

    def __init__(self, source: str, kind: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.kind = kind
        self.reason = message


class InventoryError(ConfigError):
    """A VM inventory (which MACs/IPs/ports belong to which VM) is wrong: `file:line: what`."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.reason = message
