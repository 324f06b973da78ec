"""Builders of the four derived DICOM objects (pure: datasets in, datasets out)."""
