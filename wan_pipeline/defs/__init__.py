"""The Dagster layer: wiring only. Every decision it makes is delegated to the core modules."""

import warnings

import dagster as dg

# Two deliberate choices are still marked beta/preview by Dagster 1.13: data versions on outputs (so a
# prompt edit marks everything downstream stale) and partitioned asset checks (a check per prompt set).
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
