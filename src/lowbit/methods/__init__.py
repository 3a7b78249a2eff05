"""Compression methods, one module each; ``registry.py`` is the one list of them."""
