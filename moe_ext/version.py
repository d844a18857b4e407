"""The moe_ext version (one place, read by the package and by the run facts)."""
__version__ = "0.1.0"
