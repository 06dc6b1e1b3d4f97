"""The pretrained checkpoint: a plain transformers RobertaForMaskedLM + tokenizer (3ML's [MASK] vector and
decoder are pretraining-only and dropped), so it loads as RobertaForSequenceClassification and every
fine-tuning method can start from it (``peftkit finetune ... model.name=<dir>``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from peftkit.utils.atomic import replace_dir

INFO_FILE = "pretrain.json"


def export_encoder(model, tokenizer, out_dir: Path, info: dict | None = None) -> Path:
    """Write ``model.mlm`` (weights + config) and the tokenizer to ``out_dir`` atomically (temp dir, rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        model.mlm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info or {}, indent=2, default=str))
        replace_dir(tmp, out_dir, tmp.with_name(f"{tmp.name}-old"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
