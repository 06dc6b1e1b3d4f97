"""Every location peftkit uses without being told: one place, read from the environment.

* the shipped recipes: package data of an installed wheel, else the source tree's configs/;
* the GLUE data root: env PEFTKIT_DATA_DIR, else none (GLUE is then read through the Hugging Face datasets cache);
* the WikiText-2 directory: env PEFTKIT_WIKITEXT, else a clear error (no text is guessed);
* peftkit's own cache (converted aliases, trained tokenizers): env PEFTKIT_CACHE, else ~/.cache/peftkit.

A recipe's own ``data.root`` (or a command's ``--data-root``) always wins; these are what is used without one.
The repository's Makefile exports the data variables for `make demo` and `make test`.
"""

from __future__ import annotations

import os
from pathlib import Path

from peftkit.errors import UserError

GLUE_ENV = "PEFTKIT_DATA_DIR"
WIKITEXT_ENV = "PEFTKIT_WIKITEXT"
CACHE_ENV = "PEFTKIT_CACHE"
WIKITEXT_TRAIN = "wiki.valid.tokens"  # the only non-test split available offline
WIKITEXT_TEST = "wiki.test.raw"
# Default text of a pretraining recipe, expanded when it is read (pretrain/corpus.py expands variables).
PRETRAIN_FILES = (f"${WIKITEXT_ENV}/{WIKITEXT_TRAIN}", f"${GLUE_ENV}/sst2/train.jsonl")
PRETRAIN_EVAL_FILES = (f"${WIKITEXT_ENV}/{WIKITEXT_TEST}",)


def configs_dir() -> Path:
    """The folder of the shipped recipes, one subfolder per group (glue/, lm/, quantize/, pretrain/).

    An installed wheel holds them as package data in peftkit/recipes/ (the build copies the repository's top-level
    configs/ there, see build_recipes.py); a source tree or an editable install reads configs/ itself, the one copy."""
    package = Path(__file__).resolve().parent
    packaged = package / "recipes"
    # the wheel's copy wins: a folder named configs/ beside an installed package may belong to anything
    return packaged if any(packaged.glob("*/*.yaml")) else package.parent / "configs"


def glue_root() -> str | None:
    """env PEFTKIT_DATA_DIR (a directory laid out as <task>/<split>.jsonl|tsv|parquet), else None: the hub's copy."""
    return os.environ.get(GLUE_ENV) or None


def wikitext_root() -> str:
    """env PEFTKIT_WIKITEXT, the directory holding wiki.valid.tokens and wiki.test.raw; without it one clear error."""
    root = os.environ.get(WIKITEXT_ENV)
    if not root:
        raise UserError(f"no WikiText-2 directory is given: set data.root (calib.root for quantize, --data-root for "
                        f"eval) or env {WIKITEXT_ENV} to a directory holding {WIKITEXT_TRAIN} and {WIKITEXT_TEST} "
                        f"(the Makefile exports {WIKITEXT_ENV} for this repository's data).")
    return root


def cache_dir() -> Path:
    """peftkit's own cache: env PEFTKIT_CACHE, else ~/.cache/peftkit (the usual per-user cache place)."""
    from peftkit.utils.output_paths import expand_path

    configured = os.environ.get(CACHE_ENV)
    return expand_path(configured, CACHE_ENV) if configured else Path.home() / ".cache" / "peftkit"
