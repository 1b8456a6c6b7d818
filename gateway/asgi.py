"""Entry point for hypercorn workers: the app from DIALGATE_CONFIG + env."""

from __future__ import annotations

import logging
import os
from typing import Any

from gateway.app import build_app
from gateway.cli import configure_logging
from gateway.config import load


def app_from_env() -> Any:
    if not logging.getLogger().handlers:
        configure_logging()
    # The parent process has already migrated.
    return build_app(load(os.environ.get("DIALGATE_CONFIG")), migrate=False)
