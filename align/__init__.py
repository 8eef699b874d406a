"""align: teach a language model a person's knowledge and voice, topic by topic, with one rank-1 LoRA adapter.

The public API is small: what a plugin needs to contribute components and what it is handed.
Importing it stays light (no torch); the engine loads the heavy libraries when it runs.
"""

from align.core.components import GateDecision, LanguageModel, Policy
from align.core.params import ParamError, require
from align.core.topics import PreferencePair, QuizItem, Topic, load_topics
from align.errors import AlignError
from align.plugins.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "AlignError",
    "GateDecision",
    "LanguageModel",
    "ParamError",
    "Policy",
    "PreferencePair",
    "QuizItem",
    "Topic",
    "__version__",
    "hookimpl",
    "load_topics",
    "require",
]
