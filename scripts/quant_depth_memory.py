"""Peak RSS of `peftkit quantize` on LLaMA models of the same width and growing depth, each in a fresh process.

  python scripts/quant_depth_memory.py --layers 2 4 8 --json docs/results/quant-depth-memory.json

Each model (hidden 1024, FFN 2816, 16 heads / 4 KV heads, random weights, a 40-word vocabulary) is saved as a
safetensors checkpoint with a word-level tokenizer; `python -m peftkit quantize` then runs ApiQ-bw on it in
a new interpreter and the child's peak RSS (ru_maxrss from wait4) is recorded. ``--pythonpath`` runs another
checkout of peftkit (to compare an older version on the same models).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a an of in on to is was and it this that he she they we film story river city year war game song "
         "team king book music water north south first later new old small large long high").split()


def write_model(directory: Path, layers: int, hidden: int, ffn: int) -> int:
    """Save a random LLaMA and a word-level tokenizer; return the model's quantized weight count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BertTokenizerFast

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    config = AutoConfig.for_model("llama", vocab_size=len(vocab), hidden_size=hidden, intermediate_size=ffn,
                                  num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                  max_position_embeddings=512, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(directory)
    return sum(p.numel() for n, p in model.named_parameters() if "layers" in n and p.ndim == 2)


def peak_rss_of(command: list[str], env: dict) -> tuple[int, float, str]:
    """(peak RSS in bytes, wall seconds, stderr tail) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-3000:]}")
    import resource

    # RUSAGE_CHILDREN's maxrss is the largest peak among the waited-for children: run one child per measurement.
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, seconds, out[-500:]


def child(args) -> None:
    """Run one measurement in this (fresh) process and print its JSON row."""
    root = Path(args.workdir)
    n_weights = write_model(root / "model", args.one_layer_count, args.hidden, args.ffn)
    rng = random.Random(0)
    (root / "wt").mkdir(exist_ok=True)
    for name in ("wiki.valid.tokens", "wiki.test.raw"):
        (root / "wt" / name).write_text(" ".join(rng.choice(WORDS) for _ in range(20000)) + "\n")
    recipe = {"kind": "quantize", "model": {"name": str(root / "model")},
              "calib": {"root": str(root / "wt"), "n_windows": args.windows, "seq_len": args.seq_len},
              "quant": {"method": args.method, "bits": 2, "group_size": 64, "lora_r": 64, "epochs": 1,
                        "batch_size": args.batch_size},
              "output": {"dir": str(root / "out")}}
    import yaml

    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": args.pythonpath or str(ROOT), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
           "MALLOC_MMAP_THRESHOLD_": "262144"}  # tensors > 256 KiB are mmapped: freed memory leaves the RSS
    peak, seconds, _ = peak_rss_of([sys.executable, "-m", "peftkit", "quantize", str(root / "recipe.yaml")], env)
    print("ROW " + json.dumps({"layers": args.one_layer_count, "hidden": args.hidden, "ffn": args.ffn,
                               "quantized_weights": n_weights, "fp32_weight_bytes": 4 * n_weights,
                               "peak_rss_bytes": peak, "seconds": round(seconds, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--method", default="apiq-bw")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pythonpath", default=None, help="peftkit checkout to run (default: this one)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--one-layer-count", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            # a fresh measuring process per depth, so RUSAGE_CHILDREN sees exactly one quantize run
            cmd = [sys.executable, __file__, "--child", "--workdir", tmp, "--one-layer-count", str(layers),
                   "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--method", args.method,
                   "--windows", str(args.windows), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads)] + (["--pythonpath", args.pythonpath] if args.pythonpath else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            line = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
            if out.returncode or not line:
                raise SystemExit(f"depth {layers} failed:\n{out.stderr[-3000:]}")
            row = json.loads(line[0][4:])
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        row["peak_rss_ratio_vs_first"] = round(row["peak_rss_bytes"] / rows[0]["peak_rss_bytes"], 3)
    if args.json:
        sys.path.insert(0, str(ROOT))
        from peftkit.utils.tables import machine_info

        payload = {"bench": "quant-depth-memory", "machine": machine_info(),
                   "command": "python scripts/quant_depth_memory.py " + " ".join(sys.argv[1:]), "rows": rows,
                   "notes": f"peftkit quantize, {args.method} 2-bit g64 r64, 1 epoch, {args.windows} windows x "
                            f"{args.seq_len} tokens, batch {args.batch_size}"}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
