"""Detector discovery: the explicit default list, the detectors package, entry points."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import detectors
from sva.engine.detector import check_detector
from sva.engine.registry import default_detectors, discover, load_detector, load_detectors
from sva.engine.testing import FunctionDetector
from sva.errors import DetectorError

THIRD_PARTY = '''
from sva.engine.testing import FunctionDetector

DETECTOR = FunctionDetector("third_party", lambda facts, rules: [], version="9.9")
'''


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path with a detector module and an installed distribution whose
    entry points name it (and a broken one)."""
    (tmp_path / "acme_detector.py").write_text(THIRD_PARTY)
    (tmp_path / "acme_helpers.py").write_text("X = 1\n")
    (tmp_path / "acme_broken.py").write_text("raise ImportError('needs libfoo')\n")
    dist = tmp_path / "acme_sva-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-sva\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [sva.detectors]
        acme = acme_detector
        acme_broken = acme_broken
        acme_not_a_detector = acme_helpers
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_default_list_is_explicit_and_ordered() -> None:
    assert detectors.DEFAULT_DETECTORS[0] == "process_policy"
    dets = default_detectors()
    assert [d.id for d in dets] == list(detectors.DEFAULT_DETECTORS)


def test_load_by_module_name_dotted_path_and_entry_point(plugin_path: Path) -> None:
    assert load_detector("process_policy").id == "process_policy"
    assert load_detector("acme").version == "9.9"  # entry point
    assert load_detector("detectors.process_policy").id == "process_policy"


def test_bad_names_and_broken_detectors_fail_at_load(plugin_path: Path) -> None:
    with pytest.raises(DetectorError, match=r"no module detectors\.nope and no 'sva\.detectors' entry point"):
        load_detector("nope")
    with pytest.raises(DetectorError, match="ImportError: needs libfoo"):
        load_detector("acme_broken")
    with pytest.raises(DetectorError, match="does not set DETECTOR"):
        load_detector("acme_not_a_detector")
    with pytest.raises(DetectorError, match="enabled twice"):
        load_detectors(["process_policy", "detectors.process_policy"])


def test_discover_reports_every_candidate_and_never_raises(plugin_path: Path) -> None:
    found = {d.name: d for d in discover()}
    assert found["process_policy"].default and found["process_policy"].origin == "package"
    assert found["process_policy"].detector is not None
    assert found["acme"].origin == "entry point" and found["acme"].detector.id == "third_party"  # type: ignore[union-attr]
    assert found["acme_broken"].detector is None and "needs libfoo" in (found["acme_broken"].error or "")
    assert "does not set DETECTOR" in (found["acme_not_a_detector"].error or "")
    assert next(iter(found)) == "process_policy"  # defaults first


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id": "Has Spaces"}, "must match"),
        ({"version": 1}, "needs a string `version`"),
        ({"needs": {"processes"}}, "`needs` must be a frozenset"),
        ({"material_fields": "argv"}, "`material_fields` must be"),
    ],
)
def test_check_detector_names_what_is_wrong(changes: dict[str, object], message: str) -> None:
    det = FunctionDetector("ok", lambda f, r: [])
    for k, v in changes.items():
        setattr(det, k, v)
    with pytest.raises(DetectorError, match=message):
        check_detector(det)
    with pytest.raises(DetectorError, match="has no detect"):
        check_detector(type("NoDetect", (), {"id": "x", "version": "1", "description": "", "needs": frozenset()})())
