"""The engine's core: config, topics, model loading, the run directory and the topic loop."""
