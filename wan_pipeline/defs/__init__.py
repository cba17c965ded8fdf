"""The Dagster layer: wiring only. Every decision it makes is delegated to the core modules."""
