"""Environment configuration, read in one place. The API key is held as a secret string."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BASE_URL = "https://api.aimlapi.com"
DEFAULT_CATALOG_DIR = "configs/prompt_sets"
DEFAULT_OUTPUT = "data/outputs"
DEFAULT_LEDGER_URL = "sqlite:///data/ledger.sqlite"


class Secret(str):
    """A string whose repr and str never show the value; `.reveal()` is the one way to read it."""

    def __new__(cls, value: str) -> Secret:
        return super().__new__(cls, value)

    def reveal(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"


class SettingsError(ValueError):
    """An environment variable with a value the pipeline cannot use; the message names it."""


def env_number(name: str, kind: type[int] | type[float], *, minimum: float, default: float | None = None):
    """A numeric environment variable, checked: a clear error instead of a traceback deep in a run."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


@dataclass(frozen=True)
class Settings:
    api_key: Secret | None
    base_url: str
    base_url_explicit: bool
    catalog_dir: Path
    output_root: str
    ledger_url: str
    allowed_roots: tuple[Path, ...] = field(default=())

    @property
    def uses_real_api(self) -> bool:
        return self.api_key is not None and not self.base_url_explicit


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    key = env.get("AIMLAPI_API_KEY") or None
    roots = tuple(Path(p) for p in env.get("WAN_PIPELINE_ALLOWED_ROOTS", "").split(os.pathsep) if p)
    return Settings(
        api_key=Secret(key) if key else None,
        base_url=(env.get("AIMLAPI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/"),
        base_url_explicit=bool(env.get("AIMLAPI_BASE_URL")),
        catalog_dir=Path(env.get("WAN_PIPELINE_CATALOG_DIR") or DEFAULT_CATALOG_DIR),
        output_root=env.get("WAN_PIPELINE_OUTPUT") or DEFAULT_OUTPUT,
        ledger_url=env.get("WAN_PIPELINE_LEDGER_URL") or DEFAULT_LEDGER_URL,
        allowed_roots=roots,
    )
