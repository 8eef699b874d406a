"""The old import path of the model code, which is :mod:`align.hf` now; nothing new goes here.

Kept for ``from align.core.model import EnginePolicy, attach_adapter``, which the tests that
``align new-plugin --kind objective`` wrote into plugins before align 0.1.0 moved the code (new ones
import from :mod:`align.hf`) still use. Importing it imports no heavy library (align.hf
imports those inside its functions).
"""

from __future__ import annotations

from align.hf.language_model import HFLanguageModel
from align.hf.loading import attach_adapter, load_model
from align.hf.policy import EnginePolicy, safetensors_os_errors

__all__ = ["EnginePolicy", "HFLanguageModel", "attach_adapter", "load_model", "safetensors_os_errors"]
