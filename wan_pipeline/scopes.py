"""Which API a purchase belongs to: its scope, the key under which the ledger keeps it.

A generation bought from one API does not exist on another (another account, another provider, a
local emulator), so nothing bought under one scope is ever reused or collected under another. The
scope of an API is its base URL's normalized origin (`https://api.aimlapi.com`); every instance of
the project's own emulator, whatever its port, is the one scope `emulator`; rows from before scopes
existed are `legacy`, which no API ever reuses.
"""

from __future__ import annotations

import functools
import ipaddress
from urllib.parse import urlsplit

import httpx

from wan_pipeline.settings import Settings

EMULATOR_SCOPE = "emulator"
LEGACY_SCOPE = "legacy"
EMULATOR_INFO_PATH = "/_emulator/info"
EMULATOR_NAME = "wan-pipeline"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PROBE_TIMEOUT_S = 2.0


def api_origin(base_url: str) -> str:
    """`scheme://host[:port]`, lower-cased, default port dropped: what identifies an API's account space."""
    parts = urlsplit(base_url.strip())
    scheme = (parts.scheme or "https").lower()
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"API base URL {base_url!r} has no host")
    shown_host = f"[{host}]" if ":" in host else host
    port = parts.port
    return f"{scheme}://{shown_host}" if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{scheme}://{shown_host}:{port}"


def is_loopback(base_url: str) -> bool:
    host = (urlsplit(base_url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def announces_emulator(base_url: str) -> bool:
    """Whether the server at `base_url` says it is this project's emulator (only loopback is asked)."""
    if not is_loopback(base_url):
        return False
    try:
        answer = httpx.get(base_url.rstrip("/") + EMULATOR_INFO_PATH, timeout=_PROBE_TIMEOUT_S)
        body = answer.json() if answer.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return False
    return isinstance(body, dict) and body.get("emulator") == EMULATOR_NAME


@functools.lru_cache(maxsize=64)
def api_scope(base_url: str) -> str:
    """The ledger scope of the API at `base_url` (asked once per process for a loopback URL)."""
    return EMULATOR_SCOPE if announces_emulator(base_url) else api_origin(base_url)


def scope_in_use(settings: Settings) -> str:
    """The scope the pipeline buys from with these settings: with no key and no base URL it runs
    against the embedded emulator (see `wan-pipeline run`), else against the configured API."""
    if settings.api_key is None and not settings.base_url_explicit:
        return EMULATOR_SCOPE
    return api_scope(settings.base_url)
