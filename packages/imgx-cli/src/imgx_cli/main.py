"""Entry point of the `imgx` command."""

import fire


def _version() -> str:
    """Print the installed version of the imgx packages."""
    from imgx_cli import __version__

    return f"imgx {__version__}"


def main() -> None:
    fire.Fire({"version": _version}, name="imgx")


if __name__ == "__main__":
    main()
