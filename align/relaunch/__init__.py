"""What ``align run --launcher accelerate`` has accelerate start: see ``align_main.py``."""
