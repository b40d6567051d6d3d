"""The `jaxzero` command line: one module per command, dispatched by `main`."""

from jaxzero.cli.main import main

__all__ = ["main"]
