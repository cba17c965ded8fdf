"""Estimated cost of generations: USD per second of video, by model and output resolution.

The table lives in `configs/prices.yaml`. A price the provider has not documented is marked
`estimate: true`, so every cost computed from it can say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PRICES_PATH = Path(__file__).resolve().parents[1] / "configs" / "prices.yaml"

# The table used when the package runs without its project tree (e.g. installed from a wheel).
# A test keeps it equal to configs/prices.yaml.
EMBEDDED_PRICES: dict[str, Any] = {
    "models": {
        "alibaba/wan-2-6-i2v": {
            "1080p": {
                "usd_per_second": 0.1575,
                "estimate": False,
                "source": "documented: 5 s at 1080p = 1,575,000 credits = $0.7875",
            },
            "720p": {
                "usd_per_second": 0.105,
                "estimate": True,
                "source": "not documented: estimated at 2/3 of the 1080p price",
            },
        }
    }
}


class PriceTableError(ValueError):
    """A price table that cannot be used (malformed file)."""


class PriceUnknown(LookupError):
    """No price for a model at a resolution."""


@dataclass(frozen=True)
class Price:
    usd_per_second: float
    estimate: bool
    source: str | None = None


@dataclass(frozen=True)
class PriceTable:
    prices: Mapping[tuple[str, str], Price]  # (model, resolution) -> price
    origin: str  # the file it was read from, or "embedded"

    @classmethod
    def load(cls, path: Path | None = None) -> PriceTable:
        """Read a price file; without a path, configs/prices.yaml of this project or the embedded copy."""
        if path is None:
            if not DEFAULT_PRICES_PATH.is_file():
                return cls.from_mapping(EMBEDDED_PRICES, origin="embedded")
            path = DEFAULT_PRICES_PATH
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise PriceTableError(f"{path}: malformed YAML: {exc}") from None
        return cls.from_mapping(data, origin=str(path))

    @classmethod
    def from_mapping(cls, data: Any, *, origin: str) -> PriceTable:
        """Build a table from `{"models": {model: {resolution: {usd_per_second, estimate, source}}}}`."""
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            raise PriceTableError(f"{origin}: expected a mapping with a `models` mapping")
        prices: dict[tuple[str, str], Price] = {}
        for model, by_resolution in models.items():
            if not isinstance(by_resolution, dict):
                raise PriceTableError(f"{origin}: {model}: expected a mapping of resolution -> price")
            for resolution, entry in by_resolution.items():
                prices[(str(model), str(resolution))] = _price_entry(entry, f"{origin}: {model} {resolution}")
        return cls(prices, origin)

    def price(self, model: str, resolution: str) -> Price:
        try:
            return self.prices[(model, resolution)]
        except KeyError:
            raise PriceUnknown(f"no price for {model} at {resolution} in {self.origin}") from None

    def estimate_usd(self, model: str, resolution: str, duration: int) -> float:
        """Estimated cost of one generation of `duration` seconds."""
        return round(self.price(model, resolution).usd_per_second * duration, 6)

    def is_estimate(self, model: str, resolution: str) -> bool:
        """True when the price itself is a guess (not documented by the provider)."""
        return self.price(model, resolution).estimate


def _price_entry(entry: Any, where: str) -> Price:
    if not isinstance(entry, dict):
        raise PriceTableError(f"{where}: expected a mapping with usd_per_second and estimate")
    rate, estimate, source = entry.get("usd_per_second"), entry.get("estimate", False), entry.get("source")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
        raise PriceTableError(f"{where}: usd_per_second must be a number >= 0, got {rate!r}")
    if not isinstance(estimate, bool):
        raise PriceTableError(f"{where}: estimate must be true or false, got {estimate!r}")
    return Price(float(rate), estimate, None if source is None else str(source))
