"""Memory-snapshot file formats: readers that map a file as a read-only backend, and
streaming writers that save any backend in one of those formats.

- raw:  guest-physical memory byte for byte from GPA 0; holes are zeros (sparse on disk).
- elf:  an ELF64 core like QEMU's `dump-guest-memory` writes: one PT_LOAD per RAM
        region addressed by p_paddr, and a PT_NOTE with CPU state per vCPU.
- lime: LiME's format: a list of (32-byte header, data) ranges, one per RAM region.

`sva.vmi.snapshot` is the public entry point (`open_snapshot`, the writers); the modules
here hold one format each, plus `common` (bounded file reads, atomic streaming output)
and `x86_notes` (the CPU-state note layouts).
"""
