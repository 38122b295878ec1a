"""SVP: Sampling-based Visual Projection — self-improvement of VLMs from unlabelled images."""

__version__ = "0.1.0"
