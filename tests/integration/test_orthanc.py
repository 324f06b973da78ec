"""A real PACS end to end: DCMTK storescu -> Orthanc -> (shipped Lua route) -> dermnode -> Orthanc."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from node.demo import Orthanc, orthanc_binary
from tests.peers import NodeProcess, free_port, require_shared, small_fixtures, storescu, write_fixture_dicoms

pytestmark = pytest.mark.network

DMS = "1.2.840.10008.5.1.4.1.1.77.1.7"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
PM = "1.2.840.10008.5.1.4.1.1.30"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _orthanc_or_skip():
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (tools/setup --test installs it)")


def _wait_instances(orthanc: Orthanc, n: int, timeout: float = 180) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ids = orthanc.get("/instances")
        if len(ids) >= n:
            return ids
        time.sleep(0.5)
    raise AssertionError(f"Orthanc holds {len(orthanc.get('/instances'))} of {n} instances")


def _ct_instance(path: Path) -> Path:
    """A non-dermoscopy instance (a tiny CT slice) that the routing rule must not send."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Other^Patient", "CT0001", "CT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def pacs(tmp_path, request):
    _orthanc_or_skip()
    require_shared()
    node_port = free_port()
    scripts = getattr(request, "param", None)
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node_port,
                      **({"lua_scripts": [scripts(tmp_path)]} if scripts else {})).start()
    node = NodeProcess(tmp_path / "node", orthanc.dicom_port, dest_aet=orthanc.aet, port=node_port,
                       extra_env={"DERMNODE_NODE__ALLOWED_CALLING_AETS": '["ORTHANC"]'}).start()
    yield tmp_path, orthanc, node
    node.stop()
    orthanc.stop()


def test_storescu_orthanc_node_orthanc(pacs):
    tmp_path, orthanc, node = pacs
    inputs = write_fixture_dicoms(tmp_path / "in", small_fixtures(3))
    ct = _ct_instance(tmp_path / "ct.dcm")
    storescu(orthanc.dicom_port, inputs, aet=orthanc.aet)
    storescu(orthanc.dicom_port, [ct], aet=orthanc.aet, profile=False)
    _wait_instances(orthanc, 1 + 5 * len(inputs))
    time.sleep(3)  # nothing more should arrive
    assert len(orthanc.get("/instances")) == 1 + 5 * len(inputs)

    src = pydicom.dcmread(inputs[0])
    [study] = [s for s in orthanc.get("/studies?expand") if s["MainDicomTags"]["StudyInstanceUID"] == src.StudyInstanceUID]
    assert study["PatientMainDicomTags"]["PatientID"] == src.PatientID
    assert study["PatientMainDicomTags"]["PatientName"] == str(src.PatientName)
    series = [orthanc.get(f"/series/{sid}") for sid in study["Series"]]
    assert len(series) == 1 + 4  # the original series + 4 new ones
    classes_per_series = []
    for s in series:
        classes = {orthanc.get(f"/instances/{i}/simplified-tags")["SOPClassUID"] for i in s["Instances"]}
        assert len(classes) == 1, classes  # one series per output type
        classes_per_series.append(classes.pop())
    assert sorted(classes_per_series) == sorted([DMS, DMS, SEG, PM, SR])
    for s in series:
        assert len(s["Instances"]) == len(inputs)
    # References: read every derived instance back from Orthanc.
    sources = {str(pydicom.dcmread(p).SOPInstanceUID) for p in inputs}
    derived = {DMS: [], SEG: [], PM: [], SR: []}
    for s in series:
        for iid in s["Instances"]:
            tags = orthanc.get(f"/instances/{iid}/simplified-tags")
            if tags["SOPInstanceUID"] in sources:
                continue
            derived[tags["SOPClassUID"]].append(tags)
            assert tags["StudyInstanceUID"] == src.StudyInstanceUID
            assert tags["PatientID"] == src.PatientID and tags["PatientName"] == str(src.PatientName)
            assert "not for diagnostic use" in tags.get("SeriesDescription", "").lower() or tags["SOPClassUID"] != SR
    assert all(len(v) == len(inputs) for v in derived.values()), {k: len(v) for k, v in derived.items()}
    assert {t["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] for t in derived[DMS]} == sources
    resized = {t["SOPInstanceUID"] for t in derived[DMS]}
    for seg in derived[SEG]:
        assert seg["ReferencedSeriesSequence"][0]["ReferencedInstanceSequence"][0]["ReferencedSOPInstanceUID"] in resized
    # The CT was not routed: the node journaled exactly the dermoscopy images.
    assert node.log_text().count(" received ") == len(inputs)


def _naive_route_all(tmp_path: Path) -> Path:
    p = tmp_path / "route-all.lua"
    p.write_text("function OnStoredInstance(id, tags, metadata, origin)\n  SendToModality(id, 'dermnode')\nend\n")
    return p


@pytest.mark.parametrize("pacs", [_naive_route_all], indirect=True)
def test_naive_route_everything_does_not_loop(pacs):
    tmp_path, orthanc, node = pacs
    inputs = write_fixture_dicoms(tmp_path / "in", small_fixtures(2))
    storescu(orthanc.dicom_port, inputs, aet=orthanc.aet)
    _wait_instances(orthanc, 5 * len(inputs))
    time.sleep(8)  # the 8 results were routed back to the node; give a loop time to show
    assert len(orthanc.get("/instances")) == 5 * len(inputs)
    log = node.log_text()
    assert log.count(" received ") == len(inputs)
    from tests.peers import VENV_BIN
    import json
    import subprocess

    jobs = json.loads(subprocess.run([str(VENV_BIN / "dermnode"), "jobs", "list", "--json"], env=node.env(),
                                     capture_output=True, text=True, check=True).stdout)
    assert len(jobs) == len(inputs) and all(j["state"] == "done" for j in jobs)
