"""sva detectors: one module per detector, each setting `DETECTOR`.

`DEFAULT_DETECTORS` is the explicit, ordered list the engine runs unless configured
otherwise (module names in this package). Other modules here that set `DETECTOR` can be
enabled by name; third-party detectors come in through the `sva.detectors` entry-point
group (see sva.engine.registry). The interface is `sva.engine.detector.Detector`.
"""

DEFAULT_DETECTORS: tuple[str, ...] = (
    "process_policy",
    "hidden_processes",
    "kernel_integrity",
    "yara_memory",
    "injected_code",
)
