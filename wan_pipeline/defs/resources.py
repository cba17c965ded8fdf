"""Dagster resources: configuration holders that hand out the core objects."""


from functools import cache
from pathlib import Path

import dagster as dg
from pydantic import Field, PrivateAttr

from wan_pipeline.api import AimlApiClient, AsyncAimlApiClient, ClientConfig
from wan_pipeline.catalog import PromptSet, discover_prompt_sets, load_prompt_set
from wan_pipeline.ledger import Ledger
from wan_pipeline.scopes import api_scope
from wan_pipeline.settings import DEFAULT_BASE_URL, Secret
from wan_pipeline.storage import VideoStore


class AimlApiResource(dg.ConfigurableResource):
    """The AI/ML API (or the local emulator). The key comes from `dg.EnvVar("AIMLAPI_API_KEY")`."""

    api_key: str = Field(description="Bearer key; wire it with dg.EnvVar('AIMLAPI_API_KEY') so it never shows in config.")
    base_url: str = DEFAULT_BASE_URL
    max_concurrency: int = Field(default=8, description="In-flight API calls per process.")
    expected_seconds: float | None = Field(
        default=None, description="Override the model's expected processing time (first poll timing)."
    )
    read_timeout_s: float = 60.0

    _config: ClientConfig | None = PrivateAttr(default=None)
    _clients: list[AimlApiClient] = PrivateAttr(default_factory=list)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Built once per step or tick: a bad setting fails here, before any asset code runs.
        self._config = self._build_config()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()

    def _build_config(self) -> ClientConfig:
        return ClientConfig(
            base_url=self.base_url,
            api_key=Secret(self.api_key),
            max_concurrency=self.max_concurrency,
            expected_seconds=self.expected_seconds,
            read_timeout=self.read_timeout_s,
        )

    def client_config(self) -> ClientConfig:
        return self._config or self._build_config()

    def scope(self) -> str:
        """The ledger scope of this API: what it bought is never counted as bought on another."""
        return api_scope(self.base_url)

    def client(self) -> AimlApiClient:
        """A synchronous client, closed with the resource."""
        client = AimlApiClient(self.client_config())
        self._clients.append(client)
        return client

    def async_client(self) -> AsyncAimlApiClient:
        """What the core receives (as a factory: an httpx async client belongs to one event loop, and
        each core call runs its own): submission, polling, waiting and collection never build one."""
        return AsyncAimlApiClient(self.client_config())


@cache
def _ledger(url: str, scope: str) -> Ledger:
    # One engine (connection pool) per process, URL and scope, shared by assets, checks and sensors.
    return Ledger(url, scope=scope)


class LedgerResource(dg.ConfigurableResource):
    url: str = Field(description="SQLAlchemy URL: sqlite:///data/ledger.sqlite or postgresql://...")

    def get(self, api: AimlApiResource) -> Ledger:
        """The ledger as seen from the API in use."""
        return _ledger(self.url, api.scope())


class VideoStoreResource(dg.ConfigurableResource):
    root: str = Field(description="Output root: a local path or any fsspec URL.")

    def get(self) -> VideoStore:
        return VideoStore(self.root)


class CatalogResource(dg.ConfigurableResource):
    catalog_dir: str = Field(description="Folder of prompt-set files (one file = one prompt set).")
    allowed_roots: list[str] = Field(
        default_factory=list, description="Extra folders that local image paths may point into."
    )

    def roots(self) -> list[Path]:
        return [Path(r) for r in self.allowed_roots]

    def files(self) -> dict[str, Path]:
        return discover_prompt_sets(Path(self.catalog_dir))

    def load(self, prompt_set: str) -> PromptSet:
        files = self.files()
        if prompt_set not in files:
            raise dg.Failure(
                description=f"No prompt-set file named {prompt_set}.yaml/.yml/.csv in {self.catalog_dir}",
            )
        return load_prompt_set(files[prompt_set], allowed_roots=self.roots())
