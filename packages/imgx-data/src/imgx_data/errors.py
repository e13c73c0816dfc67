"""The error raised for bad raw data or a bad dataset request."""


class DatasetError(ValueError):
    """Bad raw input or dataset request; the message names the file or field and the fix."""
