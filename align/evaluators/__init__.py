"""Built-in evaluators, each a plugin in its own module."""
