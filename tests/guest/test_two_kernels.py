"""`sva ps` on a second Debian kernel: the generic `linux-image-*-amd64` (the session's
lab guest runs the cloud kernel). Symbols are built from this guest's own RAM into an
empty cache, so nothing learnt from the cloud kernel is reused; KASLR is on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sva import lab
from sva.errors import LabError
from sva.guest.context import GuestContext
from sva.guest.processes import list_processes
from sva.lab import LabGuest
from sva.lab import kernel as kernels
from sva.symbols.sources import SymbolSource
from sva.vmi import open_target


def test_kernel_names() -> None:
    assert kernels.debian_flavour("auto") == kernels.debian_flavour("debian:cloud") == "cloud"
    assert kernels.debian_flavour("debian:generic") == "generic"
    assert kernels.debian_flavour("/boot/vmlinuz") is None
    with pytest.raises(LabError, match="debian:generic"):
        kernels.debian_flavour("debian:rt")
    with pytest.raises(LabError, match="no such file"):
        lab.up("x1", kernel="/nonexistent/bzImage")


@pytest.fixture(scope="module")
def generic_guest() -> Iterator[LabGuest]:
    name = f"g{os.getpid()}"
    guest = lab.up(name, scenario="infected", kernel="debian:generic")
    try:
        yield guest
    finally:
        lab.down(name)


@pytest.mark.lab
def test_generic_kernel_is_a_different_debian_kernel(generic_guest: LabGuest, lab_guest: LabGuest) -> None:
    release = lab.exec_in(generic_guest.name, "uname -r").output.strip()
    assert release == generic_guest.kernel_version and release.endswith("-amd64") and "cloud" not in release
    assert release != lab_guest.kernel_version
    assert generic_guest.kernel_package and generic_guest.kernel_package.startswith(f"linux-image-{release}-unsigned ")
    # KASLR is on: the kernel does not sit at its link address.
    assert "nokaslr" not in lab.exec_in(generic_guest.name, "cat /proc/cmdline").output


@pytest.mark.lab
def test_sva_ps_equals_the_guests_own_ps_on_the_generic_kernel(
    generic_guest: LabGuest, ps_comparison, tmp_path: Path
) -> None:
    env = {**os.environ, "SVA_CACHE_DIR": str(tmp_path / "cache")}  # empty: symbols from this RAM
    match = ps_comparison(generic_guest.name, env=env)
    assert "kallsyms" in match.stderr and str(tmp_path) in match.stderr, match.stderr[-2000:]
    xmrig = [p for p in match.processes.values() if p["comm"] == "xmrig"]
    assert xmrig and "stratum+tcp://pool.invalid:3333" in xmrig[0]["argv"]


@pytest.mark.lab
def test_raw_walk_equals_volatility3_on_the_generic_kernel(generic_guest: LabGuest, tmp_path: Path) -> None:
    with open_target(f"lab:{generic_guest.name}") as b:
        gc = GuestContext.attach(b, cache_dir=tmp_path / "cache")
        assert gc.symbol_table and gc.symbol_table.source is SymbolSource.GUEST_RAM
        assert gc.placement.virtual_slide or gc.placement.phys_base  # KASLR on: not at the link address
        with b.frozen():
            gc.begin_cycle()
            raw = list_processes(gc, details=False)
            gc.begin_cycle()
            objects = list_processes(gc, details=False, fast=False)
    assert raw == objects and len(raw) > 20
