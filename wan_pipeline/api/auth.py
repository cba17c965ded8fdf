"""The API key, held once: an `httpx.Auth` like httpx's own `BasicAuth` (`_auth.py`).

The key is read from its `Secret` only when a request to the API is signed. The clients build
their httpx client with it and send downloads with `auth=None`, so the key never reaches a CDN;
no action, log line, repr or exception carries it.
"""

from __future__ import annotations

from collections.abc import Generator

import httpx

from wan_pipeline.settings import Secret


class BearerAuth(httpx.Auth):
    def __init__(self, api_key: Secret):
        self._api_key = api_key if isinstance(api_key, Secret) else Secret(api_key)

    def __repr__(self) -> str:
        return "BearerAuth(api_key=***)"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._api_key.reveal()}"
        yield request
