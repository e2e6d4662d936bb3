"""Kernel symbol information for Linux guests, built from the kernel's own BTF.

`btf` parses BTF type data (from a kernel image or a guest's RAM); `kimage` unpacks an
x86 bzImage into its vmlinux ELF to get at the `.BTF` section and the version banner.
"""
