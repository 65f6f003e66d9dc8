"""Collection: statistics, the collector, and the pipelines that run a model over calibration data."""
