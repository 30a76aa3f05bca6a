"""chatforge: build a ChatGPT-style assistant from scratch, end to end."""

__version__ = "0.1.0"
