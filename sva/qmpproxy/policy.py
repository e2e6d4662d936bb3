"""Which QMP requests the proxy forwards: the exact set sva's QEMU backend and network
inventory issue, with their arguments pinned down, plus what an admin adds explicitly.

Where sva asks (keep in step when sva starts using a new command):
  sva/vmi/qmp.py        qmp_capabilities
  sva/vmi/qemu.py       query-status, stop, cont, query-cpus-fast,
                        qom-list /objects, qom-get /objects/ID {share,size,mem-path},
                        human-monitor-command "info mtree -f" / "info registers -a"
  sva/net/inventory.py  query-rx-filter, query-name
None of these changes guest memory or writes host files; `stop`/`cont` only pause.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sva.errors import ConfigError

# HMP is a free-form command language (it can write memory, reset, quit): only these exact
# lines pass, never a prefix or a pattern.
DEFAULT_HMP_LINES = frozenset({"info registers -a", "info mtree -f"})

# Refused even with --allow-extra: they write guest memory or host files, run code, add
# devices/objects or hand the appliance file descriptors. `human-monitor-command` is opened
# line by line with --allow-hmp instead.
NEVER_ALLOWED = frozenset({
    "human-monitor-command", "qom-set", "pmemsave", "memsave", "migrate", "migrate-incoming",
    "object-add", "device_add", "netdev_add", "chardev-add", "chardev-change", "getfd", "add-fd",
    "blockdev-add", "drive-mirror", "blockdev-mirror", "drive-backup", "blockdev-backup",
    "x-exit-preconfig", "exec-oob",
})  # fmt: skip

_QOM_ID = re.compile(r"^/objects/[A-Za-z][A-Za-z0-9_.-]{0,127}$")
_QOM_PROPERTIES = frozenset({"share", "size", "mem-path"})
_NIC_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_COMMAND_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Verdict:
    """Forward the request (`allowed`) or refuse it, with the text of the QMP error."""

    allowed: bool
    desc: str = ""


_OK = Verdict(True)


def _refuse(command: str, why: str = "") -> Verdict:
    extra = f" ({why})" if why else ""
    return Verdict(False, f"sva qmp-proxy: command '{command}' is not allowed{extra}")


# Per command: a check of its arguments, returning why they are refused or None.
ArgCheck = Callable[[Mapping[str, Any]], "str | None"]


def _no_args(args: Mapping[str, Any]) -> str | None:
    return f"no arguments allowed, got {', '.join(sorted(args))}" if args else None


def _only(allowed: set[str], args: Mapping[str, Any]) -> str | None:
    extra = set(args) - allowed
    return f"argument '{sorted(extra)[0]}' not allowed" if extra else None


def _qom_list(args: Mapping[str, Any]) -> str | None:
    return _only({"path"}, args) or (None if args.get("path") == "/objects" else "only path /objects")


def _qom_get(args: Mapping[str, Any]) -> str | None:
    bad = _only({"path", "property"}, args)
    if bad:
        return bad
    path, prop = args.get("path"), args.get("property")
    if not isinstance(path, str) or not _QOM_ID.match(path):
        return "only paths /objects/ID"
    if prop not in _QOM_PROPERTIES:
        return f"only properties {', '.join(sorted(_QOM_PROPERTIES))}"
    return None


def _rx_filter(args: Mapping[str, Any]) -> str | None:
    bad = _only({"name"}, args)
    if bad:
        return bad
    if "name" in args and not (isinstance(args["name"], str) and _NIC_NAME.match(args["name"])):
        return "bad NIC name"
    return None


_BUILTIN: dict[str, ArgCheck] = {
    "qmp_capabilities": _no_args,
    "query-status": _no_args,
    "stop": _no_args,
    "cont": _no_args,
    "query-cpus-fast": _no_args,
    "query-name": _no_args,
    "qom-list": _qom_list,
    "qom-get": _qom_get,
    "query-rx-filter": _rx_filter,
}


@dataclass(frozen=True)
class AllowList:
    """The proxy's policy. `extra_commands` pass with any arguments (e.g. dump-guest-memory
    for an admin who wants snapshots through the proxy); `hmp_lines` are exact HMP lines."""

    extra_commands: frozenset[str] = frozenset()
    hmp_lines: frozenset[str] = field(default=DEFAULT_HMP_LINES)

    @classmethod
    def build(cls, extra_commands: Iterable[str] = (), extra_hmp: Iterable[str] = ()) -> AllowList:
        """Validate an admin's additions; a command that could write is a ConfigError."""
        extras = set()
        for cmd in extra_commands:
            if not _COMMAND_NAME.match(cmd):
                raise ConfigError(f"--allow-extra {cmd!r}: not a QMP command name")
            if cmd in NEVER_ALLOWED:
                hint = "; use --allow-hmp for exact HMP lines" if cmd == "human-monitor-command" else ""
                raise ConfigError(f"--allow-extra {cmd}: never forwarded (it can write guest memory or host state){hint}")
            extras.add(cmd)
        lines = set(DEFAULT_HMP_LINES)
        for line in extra_hmp:
            if not line or len(line) > 200 or not line.isprintable():
                raise ConfigError(f"--allow-hmp {line!r}: one printable HMP line, at most 200 characters")
            if not line.startswith("info "):
                raise ConfigError(f"--allow-hmp {line!r}: only 'info …' lines (the read-only HMP commands)")
            lines.add(line)
        return cls(frozenset(extras), frozenset(lines))

    def check(self, command: str, arguments: Mapping[str, Any]) -> Verdict:
        if command == "human-monitor-command":
            bad = _only({"command-line"}, arguments)
            if bad:
                return _refuse(command, bad)
            line = arguments.get("command-line")
            if isinstance(line, str) and line in self.hmp_lines:
                return _OK
            shown = repr(line[:60]) if isinstance(line, str) else "that"
            return Verdict(False, f"sva qmp-proxy: command 'human-monitor-command' is not allowed with {shown}")
        rule = _BUILTIN.get(command)
        if rule is not None:
            why = rule(arguments)
            return _OK if why is None else _refuse(command, why)
        if command in self.extra_commands:
            return _OK
        return _refuse(command)
