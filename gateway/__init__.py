"""Dialgate: one gateway, many vendors' ingestion APIs, one canonical model."""

__version__ = "0.1.0"
