"""Environment set-up for applications, as in the seed: ``setup_environment_variables()``."""

from __future__ import annotations

import os
from pathlib import Path

from dotenv import load_dotenv

from .config import Settings
from .sessions.manager_base import build_settings

__all__ = ["setup_environment_variables"]


def setup_environment_variables(env_file: str | os.PathLike[str] | None = None) -> Settings:
    """Load ``.env`` into ``os.environ`` and validate the bssagent settings.

    Variables already set in the environment win over the file, so deployments can
    override a checked-in ``.env``. Provider keys (``OPENAI_API_KEY``, ``GOOGLE_API_KEY``)
    become visible to LangChain this way.

    Args:
        env_file: The file to load; defaults to ``.env`` in the working directory.

    Returns:
        The validated :class:`~bssagent.config.Settings`.

    Raises:
        ConfigurationError: A ``BSSAGENT_*`` variable holds an invalid value.
    """
    path = Path(env_file) if env_file is not None else Path(".env")
    if path.is_file():
        load_dotenv(path, override=False)
    return build_settings(None, {})
