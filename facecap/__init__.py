"""FaceCap: a workflow-orchestrated factory for face image-caption datasets."""

__version__ = "0.1.0"
