"""diffstudio: a unified diffusion engine."""

__version__ = "0.1.0"
