"""Process-wide settings that the commands (and the engine process) make before torch is imported.

Importing the package changes nothing in the user's process; `lmql-backends` (cli.py) applies
these to its own process, and the engine process gets them in its environment.
"""

from __future__ import annotations

from typing import MutableMapping

#: torch's idle OpenMP workers otherwise spin and take the cores the HTTP servers and clients
#: need; OpenMP reads this once, when torch is imported
PROCESS_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_process_defaults(environ: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Set each default of PROCESS_ENV_DEFAULTS in `environ` unless the user set it; returns `environ`."""
    for name, value in PROCESS_ENV_DEFAULTS.items():
        environ.setdefault(name, value)
    return environ
