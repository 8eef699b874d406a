"""Built-in training objectives, each a plugin in its own module."""
