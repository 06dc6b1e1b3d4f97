"""peftkit: parameter- and memory-efficient fine-tuning from YAML recipes.

Heavy libraries (torch, transformers, peft) are imported inside the functions that
need them so that ``peftkit --help`` stays fast.
"""

__version__ = "0.1.0"
