"""Model names the command line shows before any model is loaded (no torch, no transformers here).

``fedsea.model.load`` re-exports them; they live apart so that ``fedsea --help`` can print the
defaults without importing the loader (which imports torch and transformers: seconds).
"""

from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"  # the packaged SmolLM2-135M-Instruct GGUF (fedsea.model.load)
TINY_MODEL = "tiny-llama"  # a tiny random LLaMA built in memory (tests, benchmarks' servers)

__all__ = ["DEFAULT_MODEL", "TINY_MODEL"]
