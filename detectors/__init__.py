"""sva detectors: one module per detector (added by the detection-engine work)."""
