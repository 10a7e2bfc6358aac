"""The library's version (one place; leaf module)."""

__version__ = "0.1.0"
