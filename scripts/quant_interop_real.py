"""`peftkit quantize` outputs of the real smollm2-135m, loaded by peftkit and by plain transformers + peft.

    python scripts/quant_interop_real.py --json docs/results/quant-interop-real.json

Each case is a quantize output directory: the GPTQ one (ApiQ-bw 2-bit, whose calibrated LoRA is far from zero) and a
bitsandbytes NF4 one (LoftQ 4-bit, LoRA from its SVD); missing ones are made with `peftkit quantize`. For every
case and loader a fresh interpreter computes the logits of the same WikiText-2 test windows:
  peftkit       peftkit.quant.checkpoint.load_quantized(dir) (packed base + LoRA, float32 compute)
  peft          AutoPeftModelForCausalLM.from_pretrained(dir), with `import peftkit` made to fail
  peft-float32  the same load with its float tensors cast to float32 and bitsandbytes' bfloat16 CPU kernel off
                (peftkit.quant.bnb_format.compute_in_float32), i.e. the same arithmetic as peftkit's
Rows: perplexity of each loader on the windows, and the largest absolute logit difference to peftkit's, relative to
the largest peftkit logit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys
loader, quant_dir, windows_path, out_path = sys.argv[1:5]
import torch
torch.manual_seed(0)
windows = torch.load(windows_path)
if loader == "peftkit":
    from peftkit.quant.checkpoint import load_quantized
    model = load_quantized(quant_dir, with_lora=True)
elif loader == "peft":
    sys.modules["peftkit"] = None  # the output must load without peftkit
    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained(quant_dir, dtype=torch.float32, device_map="cpu")
else:  # the same load, computing in float32 as peftkit does (only the dtype helper comes from peftkit)
    from peft import AutoPeftModelForCausalLM
    from peftkit.quant.bnb_format import compute_in_float32
    model = compute_in_float32(AutoPeftModelForCausalLM.from_pretrained(quant_dir, dtype=torch.float32, device_map="cpu"))
model.eval()
with torch.inference_mode():
    logits = torch.cat([model(input_ids=w[None]).logits.float() for w in windows])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
torch.save(logits, out_path)
q_proj = next(m for name, m in model.named_modules() if name.endswith("q_proj"))
print(json.dumps({"ppl": float(nll.exp()), "layer": type(getattr(q_proj, "base_layer", q_proj)).__name__}))
"""


def windows_of(model_dir: str, text_file: Path, n: int, seq: int):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text_file.read_text(encoding="utf-8")[: 200_000], return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * seq:(i + 1) * seq] for i in range(n)])


def main() -> None:
    import torch

    from peftkit.bench.harness import write_bench
    from peftkit.quant.checkpoint import read_info

    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="runs/quant-apiq-bw-smollm2-2bit=quant-apiq-bw-smollm2-2bit,"
                                           "runs/quant-loftq-smollm2-4bit=quant-loftq-smollm2-2bit:quant.bits=4")
    parser.add_argument("--wikitext", default=os.environ.get("PEFTKIT_WIKITEXT", str(ROOT.parent / "shared/data/wikitext-2")))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            quant_dir, _, recipe = case.partition("=")
            if not (Path(quant_dir) / "quantization.json").is_file():
                name, *overrides = recipe.split(":")
                subprocess.run([sys.executable, "-m", "peftkit", "quantize", name, f"output.dir={quant_dir}",
                                "output.overwrite=true", *overrides], check=True, env=env)
            info = read_info(quant_dir)
            windows = windows_of(quant_dir, Path(args.wikitext) / "wiki.test.raw", args.windows, args.seq)
            torch.save(windows, f"{tmp}/windows.pt")
            logits = {}
            for loader in ("peftkit", "peft", "peft-float32"):
                out = subprocess.run([sys.executable, "-c", CHILD, loader, quant_dir, f"{tmp}/windows.pt",
                                      f"{tmp}/{loader}.pt"], check=True, env=env, capture_output=True, text=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                logits[loader] = torch.load(f"{tmp}/{loader}.pt")
                diff = (logits[loader] - logits["peftkit"]).abs().max().item()
                rows.append({"case": Path(quant_dir).name, "method": info["method"], "bits": info["bits"],
                             "storage": info.get("storage"), "lora_r": info["lora"]["r"], "loader": loader,
                             "layer": result["layer"], "ppl": result["ppl"], "max_abs_logit_diff": diff,
                             "relative_to_max_logit": diff / logits["peftkit"].abs().max().item()})
                print(rows[-1], flush=True)
    write_bench("quant-interop-real", rows, args.json, extra={
        "command": "python scripts/quant_interop_real.py" + (f" --json {args.json}" if args.json else ""),
        "notes": [f"{args.windows} windows x {args.seq} tokens of wiki.test.raw; logits compared in float32."]})


if __name__ == "__main__":
    main()
