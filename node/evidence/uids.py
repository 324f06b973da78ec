"""Deterministic UIDs for the derived objects.

The same source instance processed by the same model (name + version) always
yields the same UIDs, so a resend after a crash or a retry replaces the earlier
objects in the PACS instead of duplicating them. A new model version yields new
UIDs (its results are different objects).

UIDs are ``2.25.<integer form of a name-based UUID>`` (PS3.5 B.2), the UUID being
a version 5 UUID of ``"|".join(parts)`` in a fixed namespace.
"""

from __future__ import annotations

import uuid

from pydicom.dataset import Dataset

from node.model.card import ModelCard

#: Fixed namespace of dermnode's name-based UIDs. Never change it: that would
#: change every derived UID and break idempotent resends.
NAMESPACE = uuid.UUID("6f1c2a8e-5d3b-5b7e-9a41-d3e7c0b2f4a9")


def derived_uid(*parts: str) -> str:
    """``2.25.`` + the integer value of ``uuid5(NAMESPACE, "|".join(parts))``.

    At most 44 characters, so always a valid UI value (<= 64).
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part")
    for p in parts:
        if not isinstance(p, str):
            raise TypeError(f"UID parts must be str, got {type(p).__name__}")
    return "2.25." + str(uuid.uuid5(NAMESPACE, "|".join(parts)).int)


def _model(card: ModelCard) -> tuple[str, str]:
    return card.model.name, card.model.version


def instance_uid(source: Dataset, card: ModelCard, kind: str) -> str:
    """SOP Instance UID of output ``kind`` derived from ``source``."""
    return derived_uid("instance", str(source.SOPInstanceUID), *_model(card), kind)


def series_uid(source: Dataset, card: ModelCard, kind: str) -> str:
    """Series Instance UID: one series per source series, model and output kind."""
    return derived_uid("series", str(source.SeriesInstanceUID), *_model(card), kind)


def frame_of_reference_uid(source: Dataset, card: ModelCard) -> str:
    """The nominal frame of reference of the model-input grid of one source instance.

    Shared by the resized image (where its IOD has the Frame of Reference
    module), the SEG and the Parametric Map.
    """
    return derived_uid("frame-of-reference", str(source.SOPInstanceUID), *_model(card))


def tracking_uid(source: Dataset) -> str:
    """Tracking UID of the lesion shown by ``source`` when the source has none.

    Depends only on the source instance: the lesion is the same whatever model
    looks at it.
    """
    return derived_uid("tracking", str(source.SOPInstanceUID))


def dimension_organization_uid(source: Dataset, card: ModelCard, kind: str) -> str:
    """Dimension Organization UID of a multi-frame output (SEG, Parametric Map)."""
    return derived_uid("dimension-organization", str(source.SOPInstanceUID), *_model(card), kind)


def tracking(source: Dataset) -> tuple[str, str]:
    """(Tracking ID, Tracking UID) of the lesion: the source's, else deterministic ones.

    Reused by the SEG segment and every SR measurement group, so all results
    about the lesion share one identity (and follow-up images that carry the
    dermatoscope's TrackingUID line up with it).
    """
    uid = str(source.get("TrackingUID", "") or "").strip()
    ident = str(source.get("TrackingID", "") or "").strip()
    if not uid:
        uid = tracking_uid(source)
    if not ident:
        ident = f"Lesion of image {source.SOPInstanceUID}"
    return ident[:64], uid
