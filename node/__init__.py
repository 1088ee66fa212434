"""dicom-seg-node: receive a study by C-STORE, segment it, send DICOM-SEG and RTSTRUCT back."""

__version__ = "0.1.0"
