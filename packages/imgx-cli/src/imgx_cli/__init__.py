"""The `imgx` command-line interface (thin wrapper over imgx-train and imgx-data)."""

__version__ = "0.1.0"
