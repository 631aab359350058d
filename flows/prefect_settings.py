"""Prefect's settings as ovseg uses them: offline-friendly defaults and whether an API is configured.

Importing this module imports no Prefect: the CLI sets the defaults before any command runs, and
``ovseg segment`` asks ``prefect_configured`` before deciding to start a flow run at all.
"""

from __future__ import annotations

import os

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def configure_prefect() -> None:
    """Offline-friendly Prefect settings unless the user set them (called by the CLI, not on import)."""
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)


def prefect_configured() -> bool:
    """True when a Prefect API is configured (``PREFECT_API_URL`` in the environment or the profile)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url is not None
