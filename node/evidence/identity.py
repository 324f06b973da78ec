"""Who made the derived objects: the node as equipment, and the model as the algorithm."""

from __future__ import annotations

from dataclasses import dataclass

from node import __version__


@dataclass(frozen=True)
class NodeIdentity:
    """The AI node as DICOM equipment (General/Enhanced General Equipment modules)."""

    manufacturer: str = "dermnode project"
    model_name: str = "dermnode"
    software_version: str = __version__
    device_serial_number: str = "0"
    institution_name: str | None = None
    station_name: str | None = None
