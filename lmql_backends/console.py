"""How the command line and the engine process print: plain log lines and one-line warnings."""

from __future__ import annotations

import logging
import warnings


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line (``warning: ...``), without the source line Python shows by default."""
    return f"warning: {message}\n"


def configure_console(level: int = logging.INFO) -> None:
    """Log lines as bare messages at `level`; warnings as one line each."""
    logging.basicConfig(level=level, format="%(message)s")
    warnings.formatwarning = one_line_warning
