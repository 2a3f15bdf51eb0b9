"""ti2i: temporal image-to-image generation served on compiled engines."""

__version__ = "0.1.0"
