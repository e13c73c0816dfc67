"""imgx_nets."""

__version__ = "0.1.0"
