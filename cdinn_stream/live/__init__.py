"""The live pipeline: crop, batching engine, sink threads, refinement and the bluesky callback."""
