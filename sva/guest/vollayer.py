"""A volatility3 physical-memory layer that reads through any sva `Backend`.

volatility3 normally reads a file. This layer hands it the guest's physical memory as
sva sees it: a live QEMU guest (read while frozen, or while running for a fuzzy view),
a snapshot file, or LibVMI. It keeps no data of its own, so every read is live; the
page-table caches of the translation layers on top are cleared once per scan cycle by
`clear_translation_caches`, because a live guest's page tables change between cycles.
The layer is read-only: `write` refuses, as the appliance never writes guest memory.
"""

from __future__ import annotations

from typing import Any

from volatility3.framework import exceptions, interfaces
from volatility3.framework.layers import intel

from sva.errors import MemoryAccessError, SvaError
from sva.vmi.base import MappedBackend


class BackendLayer(interfaces.layers.DataLayerInterface):
    """Guest-physical memory of an sva backend, as a volatility3 data layer."""

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        config_path: str,
        name: str,
        backend: MappedBackend,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(context=context, config_path=config_path, name=name, metadata=metadata)
        self._backend = backend
        self._map = backend.memory_map

    @property
    def backend(self) -> MappedBackend:
        return self._backend

    @property
    def maximum_address(self) -> int:
        return max(self._map.end - 1, 0)

    @property
    def minimum_address(self) -> int:
        return 0

    def is_valid(self, offset: int, length: int = 1) -> bool:
        if offset < 0 or length < 1:
            return False
        try:
            self._map.translate(offset, length)
        except SvaError:
            return False
        return True

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        if length <= 0:
            return b""
        if not pad:
            try:
                return self._backend.read(offset, length)
            except MemoryAccessError as e:
                raise exceptions.InvalidAddressException(self.name, offset, str(e)) from None
        # Padded read: RAM pieces from the backend, zeros for holes.
        out = bytearray(length)
        pos = offset
        end = offset + length
        while pos < end:
            region = self._map.region_of(pos)
            if region is None:
                nxt = min((r.gpa for r in self._map if r.gpa > pos), default=end)
                pos = min(nxt, end)
                continue
            n = min(region.end, end) - pos
            try:
                self._backend.readinto(pos, memoryview(out)[pos - offset : pos - offset + n])
            except MemoryAccessError:
                pass  # a vanished backing file reads as zeros when padding is asked for
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        raise exceptions.LayerException(self.name, "sva never writes guest memory")

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return []


def clear_translation_caches() -> None:
    """Forget everything volatility3 cached about guest memory.

    volatility3 caches page-table pages, translations and whole translated reads
    (functools caches on the classes, shared by all layers), which is right for a file
    and wrong for a guest that keeps running: a list pointer read last cycle would be
    served stale, which is exactly what a DKOM rootkit changes. Called at the start of
    every scan cycle.
    """
    from volatility3.framework.interfaces.layers import TranslationLayerInterface
    from volatility3.framework.layers.linear import LinearlyMappedLayer

    for cls in (intel.Intel, intel.Intel32e, intel.IntelPAE, TranslationLayerInterface, LinearlyMappedLayer):
        for attr in ("_get_valid_table", "_translate_entry", "_translate", "read"):
            fn = cls.__dict__.get(attr)
            if fn is not None and hasattr(fn, "cache_clear"):
                fn.cache_clear()
