"""sva: a VM-introspection security appliance that watches guests from outside."""

__version__ = "0.1.0"
