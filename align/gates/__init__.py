"""Built-in gates, which decide whether a protocol step runs."""
