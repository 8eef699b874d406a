"""The old import path of the model code, which is :mod:`align.hf` now; nothing new goes here.

Kept for ``from align.core.model import EnginePolicy, attach_adapter``, which the tests that
``align new-plugin --kind objective`` writes into a plugin use (align/scaffold.py), and for the
names align/tools.py still imports from here. Importing it imports no heavy library (align.hf
imports those inside its functions).
"""

from __future__ import annotations

from align.hf.language_model import HFLanguageModel
from align.hf.loading import attach_adapter, load_model
from align.hf.policy import EnginePolicy, safetensors_os_errors

__all__ = ["EnginePolicy", "HFLanguageModel", "attach_adapter", "load_model", "safetensors_os_errors"]
