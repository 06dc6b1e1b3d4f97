import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The data beside this checkout, as the Makefile exports it (package code has no default location for it).
os.environ.setdefault("PEFTKIT_WIKITEXT", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"))
os.environ.setdefault("PEFTKIT_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
sys.path.insert(0, str(Path(__file__).parent))

from peftkit.utils.env import separate_compile_cache_per_capability  # noqa: E402 - needs the paths above

# a run of the suite with ATEN_CPU_CAPABILITY forced must not reuse kernels another capability compiled
separate_compile_cache_per_capability()

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_tokenizer_dir(tmp_path):
    from helpers.tiny import tiny_bert_tokenizer

    tiny_bert_tokenizer(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.fixture
def tiny_run_setup(tmp_path, monkeypatch):
    """A tiny BERT checkpoint + a tiny learnable sst2/mrpc/stsb data root; returns a recipe dict factory."""
    from helpers.tiny import save_tiny_classifier, write_glue_task

    model_dir = save_tiny_classifier(tmp_path / "tiny-bert")
    for task in ("sst2", "mrpc", "stsb"):
        write_glue_task(tmp_path / "glue", task, n_train=48, n_val=16)
    monkeypatch.setenv("PEFTKIT_DATA_DIR", str(tmp_path / "glue"))

    def recipe(method="lora", task="sst2", out="run", **train):
        t = {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "seed": 3, "save_every": 2, "eval_every": 3, "log_every": 1}
        t.update(train)
        return {"model": {"name": str(model_dir)}, "data": {"task": task, "max_length": 16},
                "method": {"name": method}, "train": t, "output": {"dir": str(tmp_path / out)}}

    return recipe
