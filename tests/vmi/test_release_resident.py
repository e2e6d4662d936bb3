"""MappedBackend.release_resident: the guest RAM pages a bulk scan mapped leave this
process's RSS, and reads give the same bytes afterwards."""

from __future__ import annotations

import hashlib

import pytest

from sva.vmi import open_target
from sva.vmi.base import MappedBackend

pytestmark = pytest.mark.lab


def _mapped_file_kib() -> int:
    """This process's resident pages of mapped files and shared memory (the guest's RAM
    file is one or the other, depending on where it lives)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssFile", "RssShmem"):
                fields[name] = int(value.split()[0])
    assert len(fields) == 2, fields
    return fields["RssFile"] + fields["RssShmem"]


def _digest_through_mapping(backend: MappedBackend) -> str:
    """Hash of all RAM read through the mapping (which maps every page in)."""
    h = hashlib.sha256()
    for _region, view in backend.region_views():
        h.update(view)
        view.release()
    return h.hexdigest()


def test_release_resident_drops_the_mapped_ram_and_reads_stay_the_same(lab_guest) -> None:
    with open_target(f"lab:{lab_guest.name}") as b:
        assert isinstance(b, MappedBackend)
        ram_kib = b.memory_size // 1024
        with b.frozen():  # the guest does not change its RAM while we compare
            b.release_resident()
            before = _mapped_file_kib()
            first = _digest_through_mapping(b)
            mapped = _mapped_file_kib()
            # Reading all RAM through the mapping put (nearly) all of it in our RSS.
            assert mapped - before >= ram_kib * 0.9, (before, mapped, ram_kib)
            assert b.release_resident() is True
            released = _mapped_file_kib()
            assert mapped - released >= ram_kib * 0.9, (mapped, released, ram_kib)
            # The same bytes, through the mapping (faulted in again) and through pread.
            assert _digest_through_mapping(b) == first
            h = hashlib.sha256()
            for region in b.memory_map:
                for off in range(0, region.size, 16 << 20):
                    h.update(b.read(region.gpa + off, min(16 << 20, region.size - off)))
            assert h.hexdigest() == first
        b.close()
        assert b.release_resident() is False  # closed: nothing mapped, no error
