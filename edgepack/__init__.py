"""edgepack: prune, export, quantize, validate, deploy and benchmark models for edge devices."""
__version__ = "0.1.0"
