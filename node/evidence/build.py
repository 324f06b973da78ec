"""Build the four derived objects of one source image (pure: datasets in, datasets out).

``build_evidence(source, evidence, identity, created)`` returns the resized
image, the SEG, the Parametric Map and the SR, each a pydicom Dataset with
file meta, ready for ``ds.save_as(path, enforce_file_format=True)`` or a
C-STORE. All four share the source's Study Instance UID and patient/study
attributes; each output type has its own series. UIDs are derived from the
source UIDs and the model name/version, and every time stamp from
``created``, so the same inputs give byte-identical objects (idempotent
resends).
"""

from __future__ import annotations

import datetime as _dt
from typing import NamedTuple

import copy

from pydicom.dataset import Dataset

from node.evidence.identity import NodeIdentity
from node.evidence.image import build_image, check_source
from node.evidence.pmap import build_pmap
from node.evidence.seg import build_seg
from node.evidence.sr import build_sr
from node.pipeline.result import Evidence


#: Type 2 Patient / General Study attributes: present (possibly empty) in every output, so an
#: input that omits them (a sloppy device) still gives valid objects.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def normalise_source(source: Dataset) -> Dataset:
    """A shallow copy of ``source`` that the builders can rely on: absent type 2 patient and
    study attributes added empty, and an ISO 2022 SpecificCharacterSet whose first value is
    empty (the default repertoire) spelled "ISO 2022 IR 6". The source itself is not changed."""
    fixes = [k for k in _TYPE2 if k not in source]
    charset = source.get("SpecificCharacterSet")
    values = list(charset) if isinstance(charset, (list, tuple)) or (charset is not None and not isinstance(charset, str)) else None
    fix_charset = bool(values) and len(values) > 1 and not str(values[0]).strip()
    if not fixes and not fix_charset:
        return source
    out = copy.copy(source)  # shallow: elements are shared, the element dict is not
    for k in fixes:
        setattr(out, k, "")
    if fix_charset:
        out.SpecificCharacterSet = ["ISO 2022 IR 6", *[str(v) for v in values[1:]]]
    return out


class DerivedObjects(NamedTuple):
    """The four derived instances of one source image, in sending order."""

    image: Dataset
    seg: Dataset
    pmap: Dataset
    sr: Dataset


def build_evidence(
    source: Dataset, evidence: Evidence, identity: NodeIdentity, created: _dt.datetime
) -> DerivedObjects:
    """Resized image, SEG, Parametric Map and TID 1500 SR for ``source``.

    Raises ValueError/TypeError with a precise message when the source is not a
    Dermoscopic Photography / VL Photographic image or the evidence does not
    fit it (shapes, ranges, class count).
    """
    if not isinstance(evidence, Evidence):
        raise TypeError(f"evidence must be an Evidence, not {type(evidence).__name__}")
    if not isinstance(identity, NodeIdentity):
        raise TypeError(f"identity must be a NodeIdentity, not {type(identity).__name__}")
    if not isinstance(created, _dt.datetime):
        raise TypeError(f"created must be a datetime, not {type(created).__name__}")
    source = normalise_source(source)
    check_source(source)
    image = build_image(source, evidence, identity, created)
    seg = build_seg(source, image, evidence, identity, created)
    pmap = build_pmap(source, image, evidence, identity, created)
    sr = build_sr(source, image, seg, pmap, evidence, identity, created)
    return DerivedObjects(image=image, seg=seg, pmap=pmap, sr=sr)
