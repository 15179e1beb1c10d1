"""Statistics of unit activations: streamed moments, mixture fits, per-layer summaries."""
