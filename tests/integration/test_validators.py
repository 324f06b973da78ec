"""The four derived objects checked by independent validators.

* dciodvfy (dicom3tools): IOD modules, attribute types, enumerated values, VR/VM,
  SR value-type/relationship constraints: zero "Error" lines per object.
* dcentvfy (dicom3tools): patient/study/series consistency over source + outputs.
* PixelMed DicomSRValidator: TID 1500 and its sub-templates. The Debian build
  (2022) predates the DMS modality code and the Visual explanation row
  (130401); exactly those findings are tolerated, matched narrowly by text.

Each case is written to a temporary folder as real files. Warnings are printed
(``pytest -s`` shows them). Skipped only when a tool is not installed.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from _evidence_helpers import CREATED, FIXTURE, IDENTITY, make_evidence, make_source  # noqa: E402

from node.evidence.build import build_evidence  # noqa: E402

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
JAVA_OPTS = (
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)

#: PixelMed 2022 findings that are expected (the build predates them), matched narrowly.
PIXELMED_EXPECTED_ERRORS = (
    # TID 1602 Modality: (DMS, DCM, "Dermoscopy") was added to CID 29 after 2022.
    re.compile(
        r'^Error: Template 1602 ImageLibraryEntryDescriptors/\[Row 1\] CODE \(121139,DCM,"Modality"\): '
        r'.*Code \(DMS,DCM,"Dermoscopy"\) not found in context group 29$'
    ),
    # The Visual explanation row (130401) of TID 1410/1501 postdates the build.
    re.compile(r'^Error: .*\(130401,DCM,"Visual explanation"\).*$'),
)


def _tool(name: str) -> str | None:
    """A dicom3tools program: next to this Python (the venv) or on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    return shutil.which(name)


DCIODVFY = _tool("dciodvfy")
DCENTVFY = _tool("dcentvfy")
JAVA = shutil.which("java")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FIXTURE.is_file(), reason=f"fixture image missing: {FIXTURE}"),
]

CASES = {
    "dermoscopic": dict(sop_class="dermoscopic", seg_ok=True),
    "vl-photographic": dict(sop_class="vl-photographic", seg_ok=True),
    "dermoscopic-failed-seg": dict(sop_class="dermoscopic", seg_ok=False),
    "dermoscopic-utf8-calibrated": dict(
        sop_class="dermoscopic", seg_ok=True, patient_name="Łukasiewicz^Zoë",
        character_set="ISO_IR 192", pixel_spacing=(0.02, 0.02), tracking_id="lesion A",
    ),
}
OUTPUTS = ("image", "seg", "pmap", "sr")


@dataclasses.dataclass
class Written:
    source: Path
    outputs: dict[str, Path]


def _write_case(case: str, folder: Path) -> Written:
    params = dict(CASES[case])
    seg_ok = params.pop("seg_ok")
    source = make_source(**params)
    evidence = make_evidence(seg_ok=seg_ok, failure="" if seg_ok else "mask is empty")
    objs = build_evidence(source, evidence, IDENTITY, CREATED)
    folder.mkdir(parents=True, exist_ok=True)
    src_path = folder / "source.dcm"
    source.save_as(src_path, enforce_file_format=True)
    outputs = {}
    for name in OUTPUTS:
        path = folder / f"{name}.dcm"
        getattr(objs, name).save_as(path, enforce_file_format=True)
        outputs[name] = path
    return Written(src_path, outputs)


@pytest.fixture(scope="module", params=sorted(CASES))
def written(request, tmp_path_factory) -> tuple[str, Written]:
    case = request.param
    return case, _write_case(case, tmp_path_factory.mktemp(case))


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc.stdout + proc.stderr


def _lines(output: str, prefix: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith(prefix)]


def dciodvfy_errors(path: Path) -> tuple[list[str], list[str]]:
    out = _run([DCIODVFY, str(path)])
    return _lines(out, "Error"), _lines(out, "Warning")


# --- dciodvfy -------------------------------------------------------------------------


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("output", OUTPUTS)
def test_dciodvfy_reports_no_errors(written, output):
    case, files = written
    errors, warnings = dciodvfy_errors(files.outputs[output])
    for w in warnings:
        print(f"[dciodvfy {case}/{output}] {w}")
    assert errors == [], f"{case}/{output}: " + "\n".join(errors)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_check_can_fail(tmp_path):
    """The error parsing above really sees dciodvfy errors (a broken SEG)."""
    files = _write_case("dermoscopic", tmp_path)
    ds = pydicom.dcmread(files.outputs["seg"])
    del ds.SegmentSequence[0].SegmentLabel
    ds.SegmentationType = "WRONG"
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    errors, _ = dciodvfy_errors(broken)
    assert errors, "dciodvfy found nothing wrong with a broken SEG"


# --- dcentvfy -------------------------------------------------------------------------


@pytest.mark.skipif(DCENTVFY is None, reason="dcentvfy (dicom3tools) is not installed")
def test_dcentvfy_finds_source_and_outputs_consistent(written):
    case, files = written
    paths = [str(files.source)] + [str(p) for p in files.outputs.values()]
    out = _run([DCENTVFY, *paths])
    for w in _lines(out, "Warning"):
        print(f"[dcentvfy {case}] {w}")
    assert _lines(out, "Error") == [], f"{case}: {out}"


@pytest.mark.skipif(DCENTVFY is None, reason="dcentvfy (dicom3tools) is not installed")
def test_dcentvfy_check_can_fail(tmp_path):
    files = _write_case("dermoscopic", tmp_path)
    ds = pydicom.dcmread(files.outputs["sr"])
    ds.PatientBirthDate = "19000101"
    ds.save_as(files.outputs["sr"])
    out = _run([DCENTVFY, str(files.source), *(str(p) for p in files.outputs.values())])
    assert _lines(out, "Error"), out


# --- PixelMed -------------------------------------------------------------------------


def _pixelmed(path: Path) -> str:
    return _run([JAVA, *JAVA_OPTS, "-cp", str(PIXELMED_JAR),
                 "com.pixelmed.validate.DicomSRValidator", str(path)])


@pytest.mark.skipif(JAVA is None or not PIXELMED_JAR.is_file(), reason="PixelMed (java + pixelmed.jar) is not installed")
def test_pixelmed_sr_validator(written):
    case, files = written
    out = _pixelmed(files.outputs["sr"])
    assert "Found Root Template TID_1500" in out, out
    errors = _lines(out, "Error")
    unexpected = [e for e in errors if not any(p.match(e) for p in PIXELMED_EXPECTED_ERRORS)]
    for e in errors:
        if e not in unexpected:
            print(f"[pixelmed {case}] expected (old build): {e[:200]}")
    for w in _lines(out, "Warning"):
        print(f"[pixelmed {case}] {w[:240]}")
    assert unexpected == [], f"{case}: " + "\n".join(unexpected)
    if "vl-photographic" in case:
        assert errors == []  # no DMS code in a VL Photographic report


@pytest.mark.skipif(JAVA is None or not PIXELMED_JAR.is_file(), reason="PixelMed (java + pixelmed.jar) is not installed")
def test_pixelmed_check_can_fail(tmp_path):
    """A procedure code outside DCID 100 is reported as an error (the check sees errors)."""
    files = _write_case("vl-photographic", tmp_path)
    ds = pydicom.dcmread(files.outputs["sr"])
    for item in ds.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "121058":  # Procedure reported
            code = item.ConceptCodeSequence[0]
            code.CodeValue, code.CodeMeaning = "446078004", "Dermoscopic photography"
    broken = tmp_path / "broken_sr.dcm"
    ds.save_as(broken)
    errors = _lines(_pixelmed(broken), "Error")
    assert any("context group 100" in e for e in errors), errors
