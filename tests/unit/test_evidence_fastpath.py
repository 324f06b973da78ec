"""The fast evidence builders and writer against their references, byte for byte.

* ``build_seg`` / ``build_pmap`` / ``build_sr`` set the objects up directly (and the SR's
  content tree as pre-encoded bytes); ``reference_build_*`` build them the straightforward
  way with highdicom's classes. Every object of every case must encode to the same bytes.
* ``node.evidence.encode.encode`` must write exactly what ``pydicom.dcmwrite`` writes, for
  our objects, for datasets read from files (raw elements) and when it falls back.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import io
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _evidence_helpers import CREATED, FIXTURE, IDENTITY, make_card, make_evidence, make_source  # noqa: E402

from node.evidence import codes  # noqa: E402
from node.evidence.build import DerivedObjects, build_evidence  # noqa: E402
from node.evidence.encode import encode  # noqa: E402
from node.evidence.identity import NodeIdentity  # noqa: E402
from node.evidence.image import build_image  # noqa: E402
from node.evidence.pmap import reference_build_pmap  # noqa: E402
from node.evidence.seg import reference_build_seg  # noqa: E402
from node.evidence.sr import reference_build_sr  # noqa: E402
from node.pipeline.result import CAM_NORMALISATION, Crop  # noqa: E402

pytestmark = pytest.mark.skipif(not FIXTURE.is_file(), reason=f"fixture image missing: {FIXTURE}")


def pydicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def reference_build(source, evidence, identity=IDENTITY, created=CREATED) -> DerivedObjects:
    """The four objects built with highdicom's classes (the specification of the fast path)."""
    image = build_image(source, evidence, identity, created)
    seg = reference_build_seg(source, image, evidence, identity, created)
    pmap = reference_build_pmap(source, image, evidence, identity, created)
    sr = reference_build_sr(source, image, seg, pmap, evidence, identity, created)
    return DerivedObjects(image, seg, pmap, sr)


def first_difference(a: Dataset, b: Dataset, path: str = "") -> str | None:
    """Where two datasets differ (for a readable failure), or None."""
    for tag in sorted(set(a.keys()) | set(b.keys())):
        if tag not in a or tag not in b:
            return f"{path}{tag}: only in {'reference' if tag in a else 'fast'}"
        x, y = a[tag], b[tag]
        if x.VR == "SQ" and y.VR == "SQ":
            if len(x.value) != len(y.value):
                return f"{path}{x.keyword}: {len(x.value)} vs {len(y.value)} items"
            for i, (p, q) in enumerate(zip(x.value, y.value)):
                where = first_difference(p, q, f"{path}{x.keyword}[{i}].")
                if where:
                    return where
        elif x.VR != y.VR or x.value != y.value:
            return f"{path}{x.keyword}: {x.VR} {x.value!r} vs {y.VR} {y.value!r}"
    return None


def assert_same_objects(fast: DerivedObjects, ref: DerivedObjects) -> None:
    for name in DerivedObjects._fields:
        want = pydicom_bytes(getattr(ref, name))
        got = encode(getattr(fast, name))
        if got != want:
            where = first_difference(
                pydicom.dcmread(io.BytesIO(want)), pydicom.dcmread(io.BytesIO(got))
            )
            pytest.fail(f"{name}: fast build differs from the reference at {where or 'the file meta/preamble'}")
        # The fast writer also matches pydicom on the fast objects themselves.
        assert pydicom_bytes(getattr(fast, name)) == got, name


CASES = {
    "dermoscopic": dict(source=dict(sop_class="dermoscopic"), evidence=dict()),
    "vl-photographic": dict(source=dict(sop_class="vl-photographic"), evidence=dict(top=0)),
    "failed-segmentation": dict(source=dict(sop_class="dermoscopic"), evidence=dict(seg_ok=False, failure="empty mask")),
    "utf8-calibrated-tracked-left": dict(
        source=dict(sop_class="dermoscopic", patient_name="Łukasiewicz^Zoë", character_set="ISO_IR 192",
                    pixel_spacing=(0.02, 0.025), tracking_id="lesion A", laterality="L"),
        evidence=dict(top=6),
    ),
    "latin1-no-anatomy": dict(
        source=dict(sop_class="vl-photographic", patient_name="Müller^Jürgen", character_set="ISO_IR 100", site=None),
        evidence=dict(seg_ok=False, failure="mask touches the border"),
    ),
    "padded-crop-other-shape": dict(
        source=dict(sop_class="dermoscopic", laterality="R"),
        evidence=dict(size=(240, 200), crop=Crop(-20, -10, 600, 700, "lesion-crop", padded=True), seed=3),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_build_equals_highdicom_reference(case):
    spec = CASES[case]
    source = make_source(**spec["source"])
    evidence = make_evidence(**spec["evidence"])
    assert_same_objects(build_evidence(source, evidence, IDENTITY, CREATED), reference_build(source, evidence))


@pytest.mark.parametrize("probabilities", [
    [1.0, 0, 0, 0, 0, 0, 0],
    [1e-12, 3e-7, 0.25, 1 / 3, 0.0, 0.41666666666666663 - 3e-7 - 1e-12, 0],
    list(np.random.default_rng(11).dirichlet(np.ones(7))),
])
def test_probability_values_are_encoded_as_highdicom_does(probabilities):
    source = make_source()
    evidence = dataclasses.replace(make_evidence(), probabilities=np.asarray(probabilities, dtype=np.float64))
    assert_same_objects(build_evidence(source, evidence, IDENTITY, CREATED), reference_build(source, evidence))


def test_other_identity_card_and_time():
    """Nothing cached for one model card or node leaks into another's objects."""
    import datetime as dt

    source = make_source()
    identity = NodeIdentity(device_serial_number="B-2", institution_name=None, station_name="ROOM 2")
    created = dt.datetime(2026, 7, 1, 23, 59, 58, 123456, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    for card in (make_card(version="2.0.0", demo=False), make_card(untrained=True), make_card()):
        evidence = make_evidence(card)
        fast = build_evidence(source, evidence, identity, created)
        assert_same_objects(fast, reference_build(source, evidence, identity, created))


def test_source_without_manufacturer_or_lossy_compression():
    source = make_source()
    del source.Manufacturer
    source.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # as if it had been sent uncompressed
    source.LossyImageCompression = "00"
    evidence = make_evidence()
    assert_same_objects(build_evidence(source, evidence, IDENTITY, CREATED), reference_build(source, evidence))


def test_concurrent_builds_give_the_same_bytes():
    source = make_source()
    evidences = [make_evidence(top=i % 7, seed=i) for i in range(8)]
    expected = [[encode(x) for x in build_evidence(source, e, IDENTITY, CREATED)] for e in evidences]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda e: [encode(x) for x in build_evidence(source, e, IDENTITY, CREATED)], evidences))
    assert got == expected


def test_sr_content_reads_like_any_dataset():
    """The SR's pre-encoded content tree parses on access and survives edits and copies."""
    source = make_source()
    evidence = make_evidence()
    sr = build_evidence(source, evidence, IDENTITY, CREATED).sr
    want = encode(sr)
    assert sr.ContentSequence[0].ConceptNameCodeSequence[0].CodeValue == "121049"  # parsed on access
    assert encode(sr) == want and pydicom_bytes(sr) == want
    assert encode(copy.deepcopy(sr)) == want
    groups = sr.ContentSequence[-2].ContentSequence
    assert len(groups) == len(evidence.card.classes)
    sr.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning = "English (US)"  # an edit is written
    assert encode(sr) == pydicom_bytes(sr) != want


def test_writer_matches_pydicom_on_read_datasets_and_falls_back():
    source = make_source(character_set="ISO_IR 192", patient_name="Łukasiewicz^Zoë")
    built = build_evidence(source, make_evidence(), IDENTITY, CREATED)
    for ds in (*built, source):
        read = pydicom.dcmread(io.BytesIO(pydicom_bytes(ds)))  # raw elements, original encoding set
        assert encode(read) == pydicom_bytes(read)
    # An ambiguous VR (US or SS) and another transfer syntax: pydicom writes them.
    odd = Dataset()
    odd.SOPClassUID = codes.SEGMENTATION
    odd.SOPInstanceUID = "1.2.3"
    odd.PixelRepresentation = 1
    odd.SmallestImagePixelValue = -5
    odd.file_meta = FileMetaDataset()
    odd.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert encode(copy.deepcopy(odd)) == pydicom_bytes(copy.deepcopy(odd))
    odd.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert encode(copy.deepcopy(odd)) == pydicom_bytes(copy.deepcopy(odd))


def test_cam_normalisation_is_a_plain_constant():
    import node.evidence.pmap as pmap

    assert pmap.CAM_NORMALISATION is CAM_NORMALISATION
    assert "Grad-CAM" in CAM_NORMALISATION and len(CAM_NORMALISATION) < 200
    assert not hasattr(pmap, "_classifier_normalisation")
