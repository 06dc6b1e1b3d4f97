"""Benchmark registry. Each bench module defines ``run(quick: bool, options: dict) -> list[dict]``
(the rows) and is imported only when that bench runs."""

from __future__ import annotations

# name: (module, one-line description)
BENCHES: dict[str, tuple[str, str]] = {
    "latency": ("peftkit.bench.latency", "Inference latency of base vs merged PaFi/HiWi vs unmerged LoRA (issue 3)."),
    "memory": ("peftkit.bench.memory", "Activation bytes, peak RSS and step time: full, LoRA, MEFT1-3 (issue 4)."),
    "quant": ("peftkit.bench.quant", "Output error and perplexity of RTN, NF, LoftQ, ApiQ at 2/3/4 bits (issue 5)."),
    "flops": ("peftkit.bench.flops", "FLOPs and step time of vanilla MLM vs 3ML-self/cross (issue 6)."),
    "glue": ("peftkit.bench.glue", "Every method on GLUE with its costs (issue 7)."),
    "peers": ("peftkit.bench.peers", "peftkit vs the tools users would pick instead (issue 7)."),
}
