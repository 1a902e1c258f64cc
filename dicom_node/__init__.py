"""dicom-node: a DICOM AI node that receives studies, runs algorithms and sends results back."""

__version__ = "0.1.0"
