"""Pure processing: decode -> preprocess -> classify + Grad-CAM -> segment."""
