"""align's Hugging Face seam: everything that imports transformers, peft, trl, accelerate,
safetensors or torch for the model.

- :mod:`~align.hf.source`: ``model.path`` checked and resolved; GGUF files converted to a cached
  safetensors directory;
- :mod:`~align.hf.loading`: ``(model, tokenizer)`` loaded, the rank-1 adapter attached;
- :mod:`~align.hf.language_model`: the model as the :class:`align.LanguageModel` evaluators score;
- :mod:`~align.hf.policy`: the engine's :class:`align.Policy` (training arguments, callbacks,
  adapter snapshots, saving);
- :mod:`~align.hf.training`: helpers for objectives that train with a TRL trainer;
- :mod:`~align.hf.processes`: torch's and accelerate's side of a multi-process launch.

These modules import the libraries inside their functions, so importing one is cheap.
``align.core`` imports none of those libraries (tests/test_layers.py checks); of its modules
only ``runner`` (which builds the policy) and ``distributed`` (the collectives of a launch) reach
into this package, at the point of use, plus ``core/model.py``'s re-exports of the old import path.
"""
