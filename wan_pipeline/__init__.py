"""wan-pipeline: Wan 2.6 image-to-video generations through the AI/ML API, orchestrated by Dagster."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wan-pipeline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
