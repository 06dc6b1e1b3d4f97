"""Where the peak RSS of a LoRA step goes: the float32 model against its packed low-bit quantize output.

  python scripts/lowbit_lora_memory.py QUANT_DIR [--model smollm2-135m] [--batch 1] [--gc on|off]
                                       [--json docs/results/lowbit-lora-memory.json]

One fresh interpreter per side (the environment of peftkit.bench.packed_step.measure), with the same LoRA, loss
and AdamW kernel. Figures in MB over the interpreter's idle RSS: the bytes of the model's tensors, of the LoRA
factors, and of AdamW's state (computed from the tensors); the RSS after a warm-up step and again after glibc's
malloc_trim (what the heap holds free but not yet given back); and the peak of the forward, of the backward and of
the optimizer step of a second step (each read from VmHWM, reset before the phase).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(spec: dict) -> dict:
    import ctypes

    import torch

    from peftkit.bench.costs import _maxrss_bytes, _reset_peak_rss
    from peftkit.bench.packed_step import _tensor_bytes, load_side, lora_of, warm_up_peft, with_lora

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = lora_of(spec)
    warm_up_peft()
    _reset_peak_rss()
    idle = _rss_bytes()
    model = load_side(spec, config)
    model_bytes = _tensor_bytes(model)
    model, optimizer = with_lora(model, config, spec["gradient_checkpointing"])
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]),
                        generator=torch.Generator().manual_seed(0))
    mb = 2 ** 20

    def over_idle(value):
        return round((value - idle) / mb, 1)

    row = {"side": spec["side"], "batch": spec["batch"], "gradient_checkpointing": spec["gradient_checkpointing"],
           "lora_r": config.r, "model_mb": round(model_bytes / mb, 1),
           "lora_mb": round(sum(p.numel() * p.element_size() for p in params) / mb, 1)}
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    row["adamw_state_mb"] = round(sum(v.numel() * v.element_size() for p in params for v in optimizer.state[p].values()
                                      if torch.is_tensor(v)) / mb, 1)
    row["after_step_mb"] = over_idle(_rss_bytes())
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    row["after_trim_mb"] = over_idle(_rss_bytes())
    for phase in ("forward", "backward", "optimizer"):
        _reset_peak_rss()
        if phase == "forward":
            loss = model(input_ids=ids, labels=ids).loss
        elif phase == "backward":
            loss.backward()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        row[f"{phase}_peak_mb"] = over_idle(_maxrss_bytes())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quant_dir")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--gc", choices=["on", "off"], default="on")
    parser.add_argument("--lora-r", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("ROW " + json.dumps(child(json.loads(args.child))))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": "262144"}  # as peftkit.bench.packed_step.measure
    rows = []
    for batch in args.batch:
        for side in ("full", "packed"):
            spec = {"quant_dir": str(Path(args.quant_dir).resolve()), "source_model": args.model, "side": side,
                    "batch": batch, "seq": args.seq, "gradient_checkpointing": args.gc == "on",
                    "lora_r": args.lora_r, "dtype": args.dtype}
            proc = subprocess.run([sys.executable, __file__, args.quant_dir, "--child", json.dumps(spec)],
                                  capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if proc.returncode or not lines:
                raise SystemExit(f"the {side} run failed:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(lines[-1][4:]))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        from peftkit.utils.tables import machine_info

        args.json.write_text(json.dumps({
            "bench": args.json.stem, "machine": {**machine_info(), "threads": 1},
            "command": "python scripts/lowbit_lora_memory.py " + " ".join(sys.argv[1:]), "rows": rows,
            "notes": f"MB over the idle interpreter; packed side unpacked into {args.dtype}; LoRA on the quantize "
                     f"output's modules; {args.seq} tokens per sequence"}, indent=1) + "\n")


if __name__ == "__main__":
    main()
