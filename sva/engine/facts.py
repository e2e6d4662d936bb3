"""Guest facts: what a guest *is* this cycle, computed lazily once per cycle by providers.

The contract between whoever knows how to compute a fact (the volatility3 layer, a
backend, a lab's own view) and the detectors that use it:

- A **fact provider** has a `name`, a `consistent` flag, optionally `requires` (names of
  other facts it reads) and `compute(ctx) -> value`:

      class Processes:
          name = "processes"
          consistent = True            # walks guest memory: computed while the guest is frozen
          requires = frozenset({"kernel_symbols"})
          def compute(self, ctx: FactContext) -> tuple[ProcessInfo, ...] | Unavailable: ...

  `fact_provider(name, consistent=...)` turns a plain function into one.
- The value must be **immutable and self-contained** (tuples, frozen dataclasses, bytes;
  never a memoryview into guest RAM): consistent facts are computed inside the freeze and
  detectors read them after the guest runs again.
- A fact that cannot be computed is `Unavailable(reason)`: return it, or raise (any
  exception becomes `Unavailable("ExcType: message")`). Nothing a provider does kills
  the cycle. Detectors needing an unavailable fact are skipped with a health event.
- A provider reads other facts only through `ctx.fact(name)` and only those it lists in
  `requires`; the engine computes the whole closure of what enabled detectors need,
  and each fact at most once per cycle (`CycleFacts`).
- Guest memory is hostile: bound every walk (see MAX_PROCESSES) and watch
  `ctx.time_left()`.
- A consistent fact's value must be a function of the guest memory it reads, the facts
  it requires and the boot's symbols: the engine reuses last cycle's value when none of
  those changed (see Engine._collect_from). A provider whose value depends on anything
  else (the cycle number, the clock) sets `reusable = False`.

Detectors see facts through a `FactView`, a read-only mapping restricted to the names the
detector declared in `needs`.

`FACTS` documents the names and types that are agreed on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sva.errors import ConfigError, DetectorError

if TYPE_CHECKING:
    from sva.engine.model import VmIdentity
    from sva.vmi.base import Backend

log = logging.getLogger("sva.engine.facts")

MAX_PROCESSES = 65536  # a `processes` provider stops walking (and says so) beyond this
MAX_ARGV = 256  # arguments kept per process
MAX_ARG_LEN = 4096  # characters kept per argument

FACTS: Mapping[str, str] = {
    "phys_memory_size": "int: bytes of guest RAM (the memory map's total)",
    "memory_map": "tuple[tuple[int, int], ...]: (guest-physical address, size) of each RAM region",
    "vcpu_registers": "tuple[sva.vmi.base.Registers, ...]: each vCPU's state, read while frozen",
    "processes": (
        "tuple[ProcessInfo, ...]: every thread-group leader on the kernel's task list, kernel "
        f"threads included, sorted by pid; at most {MAX_PROCESSES} (else Unavailable)"
    ),
    "boot_id": "str: identifies this boot of the guest; stamped on alerts, a change resets dedup",
}


@dataclass(frozen=True, slots=True)
class Unavailable:
    """A fact that could not be computed this cycle, and why (one line for a human)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One guest process as the `processes` fact reports it.

    `start_time` is the task's start time in nanoseconds since boot (task_struct.start_time);
    with `pid` it identifies a process across cycles. `exe` is the path of the mapped
    executable (mm->exe_file) without a " (deleted)" suffix; `exe_deleted` says the file
    was unlinked; a memfd executable has an `exe` of "/memfd:NAME". `argv` is what the
    process's own memory says (it can lie); `comm` is at most 15 characters.
    """

    pid: int
    ppid: int
    comm: str
    argv: tuple[str, ...] = ()
    uid: int | None = None
    exe: str | None = None
    exe_deleted: bool = False
    start_time: int | None = None
    task_address: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.argv, tuple):
            object.__setattr__(self, "argv", tuple(self.argv))

    @property
    def cmdline(self) -> str:
        """The arguments joined by spaces (as `ps` shows them)."""
        return " ".join(self.argv)

    @property
    def is_kernel_thread(self) -> bool:
        return not self.argv and self.exe is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid, "ppid": self.ppid, "comm": self.comm, "argv": list(self.argv)}
        if self.uid is not None:
            out["uid"] = self.uid
        if self.exe is not None:
            out["exe"] = self.exe
        if self.exe_deleted:
            out["exe_deleted"] = True
        if self.start_time is not None:
            out["start_time"] = self.start_time
        if self.task_address is not None:
            out["task_address"] = f"0x{self.task_address:x}"
        return out


@runtime_checkable
class FactProvider(Protocol):
    """Computes one named fact for one cycle. See the module docstring for the contract."""

    @property
    def name(self) -> str: ...

    @property
    def consistent(self) -> bool:
        """True: reads guest memory that must not change meanwhile, so it is computed while frozen."""
        ...

    def compute(self, ctx: FactContext) -> Any: ...


def provider_requires(provider: FactProvider) -> frozenset[str]:
    """The facts `provider` reads (its optional `requires` attribute)."""
    return frozenset(getattr(provider, "requires", frozenset()))


@dataclass(frozen=True)
class FunctionProvider:
    """A fact provider made from a function (see `fact_provider`)."""

    name: str
    fn: Callable[[FactContext], Any]
    consistent: bool = True
    requires: frozenset[str] = frozenset()
    description: str = ""

    def compute(self, ctx: FactContext) -> Any:
        return self.fn(ctx)


def fact_provider(
    name: str, *, consistent: bool = True, requires: Iterable[str] = (), description: str = ""
) -> Callable[[Callable[[FactContext], Any]], FunctionProvider]:
    """Decorator: `@fact_provider("boot_id", consistent=False)` over `def f(ctx): ...`."""

    def wrap(fn: Callable[[FactContext], Any]) -> FunctionProvider:
        return FunctionProvider(name, fn, consistent, frozenset(requires), description or (fn.__doc__ or "").strip())

    return wrap


class FactRegistry:
    """The fact providers an engine can use, by name. One provider per name."""

    def __init__(self, providers: Iterable[FactProvider] = ()) -> None:
        self._providers: dict[str, FactProvider] = {}
        for p in providers:
            self.register(p)

    def register(self, provider: FactProvider, *, replace: bool = False) -> None:
        name = getattr(provider, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"fact provider {provider!r} has no name")
        if not callable(getattr(provider, "compute", None)) or not isinstance(
            getattr(provider, "consistent", None), bool
        ):
            raise ConfigError(f"fact provider {name!r} needs compute(ctx) and a bool `consistent`")
        if name in self._providers and not replace:
            raise ConfigError(f"fact {name!r} already has a provider ({self._providers[name]!r})")
        self._providers[name] = provider

    def get(self, name: str) -> FactProvider | None:
        return self._providers.get(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._providers)

    def __contains__(self, name: object) -> bool:
        return name in self._providers

    def closure(self, names: Iterable[str]) -> list[str]:
        """`names` and everything their providers require, dependencies first, deterministic."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(n: str, path: tuple[str, ...]) -> None:
            if n in seen or n in path:  # a dependency cycle is reported when computed
                return
            p = self._providers.get(n)
            for dep in sorted(provider_requires(p)) if p is not None else ():
                visit(dep, (*path, n))
            seen.add(n)
            order.append(n)

        for n in sorted(set(names)):
            visit(n, ())
        return order


@dataclass(frozen=True)
class FactRecord:
    """How computing one fact went this cycle (for the cycle report)."""

    name: str
    seconds: float
    available: bool
    reason: str = ""
    in_freeze: bool = False
    reused: bool = False  # the last cycle's value: every page it was computed from is unchanged

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "seconds": round(self.seconds, 6), "available": self.available}
        if self.reason:
            out["reason"] = self.reason
        if self.in_freeze:
            out["in_freeze"] = True
        if self.reused:
            out["reused"] = True
        return out


class FactContext:
    """What a provider gets: the backend, the VM, the cycle, a deadline and its declared facts."""

    def __init__(self, facts: CycleFacts, provider: FactProvider) -> None:
        self._facts = facts
        self._allowed = provider_requires(provider)
        self._name = provider.name

    @property
    def backend(self) -> Backend | None:
        return self._facts.backend

    @property
    def vm(self) -> VmIdentity | None:
        return self._facts.vm

    @property
    def cycle(self) -> int:
        return self._facts.cycle

    @property
    def attempt(self) -> int:
        """Counts the engine's tries at this cycle's consistent facts (see
        `CycleFacts.forget`): a provider caching reads per cycle drops them when it changes."""
        return self._facts.attempt

    def time_left(self) -> float:
        """Seconds until this cycle's fact deadline; walks should stop (Unavailable) at 0."""
        return self._facts.deadline - time.monotonic()

    def require_backend(self) -> Backend:
        """The backend, or raise (the fact becomes Unavailable) when the engine has none."""
        if self._facts.backend is None:
            raise ConfigError("this engine has no VMI backend")
        return self._facts.backend

    def fact(self, name: str) -> Any:
        """Another fact's value or its `Unavailable`; only facts listed in `requires`."""
        if name not in self._allowed:
            return Unavailable(f"fact {self._name!r} read {name!r} without listing it in `requires`")
        return self._facts.get(name)


class CycleFacts:
    """The facts of one cycle: each computed on first request, at most once, then cached."""

    def __init__(
        self,
        registry: FactRegistry,
        *,
        backend: Backend | None = None,
        vm: VmIdentity | None = None,
        cycle: int = 0,
        time_budget: float = 60.0,
    ) -> None:
        self.registry = registry
        self.backend = backend
        self.vm = vm
        self.cycle = cycle
        self.deadline = time.monotonic() + time_budget
        self.in_freeze = False  # set by the engine while the guest is frozen
        self.attempt = 0  # bumped by forget(): the values read so far are being redone
        self._values: dict[str, Any] = {}
        self._stack: list[str] = []
        self._records: dict[str, FactRecord] = {}

    def computed(self, name: str) -> bool:
        return name in self._values

    def get(self, name: str) -> Any:
        """The value of fact `name`, or `Unavailable(reason)`. Never raises."""
        if name in self._values:
            return self._values[name]
        if name in self._stack:
            loop = " -> ".join([*self._stack[self._stack.index(name) :], name])
            return Unavailable(f"dependency cycle between facts: {loop}")
        provider = self.registry.get(name)
        t0 = time.perf_counter()
        if provider is None:
            value: Any = Unavailable(f"no provider for fact {name!r}")
        else:
            self._stack.append(name)
            try:
                value = provider.compute(FactContext(self, provider))
            except Exception as e:  # noqa: BLE001 - a fact's failure is data, not a crash
                log.warning("fact %s failed: %s: %s", name, type(e).__name__, e, exc_info=True)
                value = Unavailable(f"{type(e).__name__}: {e}")
            finally:
                self._stack.pop()
        seconds = time.perf_counter() - t0
        self._values[name] = value
        reason = value.reason if isinstance(value, Unavailable) else ""
        self._records[name] = FactRecord(name, seconds, not isinstance(value, Unavailable), reason, self.in_freeze)
        return value

    def records(self) -> tuple[FactRecord, ...]:
        return tuple(self._records.values())

    def reuse(self, name: str, value: Any, seconds: float = 0.0) -> None:
        """Take `value` for fact `name` this cycle without computing it (the engine does
        this when the memory it was computed from did not change)."""
        self._values[name] = value
        self._records[name] = FactRecord(name, seconds, not isinstance(value, Unavailable), "", self.in_freeze,
                                         reused=True)  # fmt: skip

    def names(self) -> frozenset[str]:
        """The facts computed so far."""
        return frozenset(self._values)

    def forget(self, names: Iterable[str]) -> None:
        """Drop these facts' values so that they are computed again (the engine does
        this when a walk read memory that was not part of a consistent copy) and start a
        new attempt. Their records stay until they are recomputed."""
        for name in names:
            self._values.pop(name, None)
        self.attempt += 1


class UndeclaredFactError(DetectorError):
    """A detector read a fact it did not declare in `needs`."""


class FactView(Mapping[str, Any]):
    """A detector's read-only window on this cycle's facts: only the names it declared.

    The engine computes every declared fact before calling the detector and does not call
    it if one is unavailable, so reading a declared fact always gives a value.
    """

    __slots__ = ("_detector", "_facts", "_needs")

    def __init__(self, detector: str, needs: frozenset[str], facts: CycleFacts) -> None:
        self._detector = detector
        self._needs = frozenset(needs)
        self._facts = facts

    def __getitem__(self, name: str) -> Any:
        if name not in self._needs:
            declared = ", ".join(sorted(self._needs)) or "nothing"
            raise UndeclaredFactError(
                self._detector, f"read fact {name!r} but its `needs` declares only {declared}"
            )
        value = self._facts.get(name)
        if isinstance(value, Unavailable):
            raise DetectorError(self._detector, f"fact {name!r} is unavailable: {value.reason}")
        return value

    def __contains__(self, name: object) -> bool:
        return name in self._needs

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._needs))

    def __len__(self) -> int:
        return len(self._needs)

    def __repr__(self) -> str:
        return f"FactView({self._detector!r}, needs={sorted(self._needs)})"


# -- facts every backend can give -------------------------------------------------------


@fact_provider("phys_memory_size", consistent=False)
def phys_memory_size(ctx: FactContext) -> int:
    """Bytes of guest RAM."""
    return ctx.require_backend().memory_size


@fact_provider("memory_map", consistent=False)
def memory_map(ctx: FactContext) -> tuple[tuple[int, int], ...]:
    """(guest-physical address, size) of each RAM region."""
    return tuple((r.gpa, r.size) for r in ctx.require_backend().memory_map)


@fact_provider("vcpu_registers", consistent=True)
def vcpu_registers(ctx: FactContext) -> Any:
    """Each vCPU's registers, read while the guest is frozen."""
    backend = ctx.require_backend()
    if not backend.capabilities.registers:
        return Unavailable(f"{backend.target} has no vCPU registers")
    return tuple(backend.regs(i) for i in range(backend.vcpu_count))


def backend_fact_providers() -> list[FactProvider]:
    """The facts any backend provides, for `FactRegistry(backend_fact_providers())`."""
    return [phys_memory_size, memory_map, vcpu_registers]


@dataclass(frozen=True)
class StaticFact:
    """A fact whose value is known up front (configuration, a snapshot's precomputed data)."""

    name: str
    value: Any
    consistent: bool = False
    requires: frozenset[str] = field(default_factory=frozenset)

    def compute(self, ctx: FactContext) -> Any:
        return self.value
