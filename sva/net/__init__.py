"""Mirrored virtual-switch traffic: capture sources, the per-packet fast path, flows and detection."""
