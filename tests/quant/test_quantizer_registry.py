"""Quantizers register like methods: one file each under peftkit/quant/quantizers/, found without importing them, and
the pipeline reaches a quantizer only through the registry."""

import subprocess
import sys
from pathlib import Path

from helpers.quant import options, structured_llama, windows

from peftkit.utils.registry import QUANTIZERS, Entry

ROOT = Path(__file__).resolve().parents[2]


def test_each_quantizer_is_one_registered_file():
    files = sorted(p.stem for p in (ROOT / "peftkit" / "quant" / "quantizers").glob("*.py") if p.stem != "__init__")
    assert sorted(e.module.rpartition(".")[2] for e in QUANTIZERS.entries()) == files
    assert QUANTIZERS.names() == ["apiq-bw", "apiq-lw", "gptq", "loftq", "nf", "rtn"]
    for entry in QUANTIZERS.entries():
        assert entry.target.name == entry.name and entry.help


def test_listing_the_quantizers_imports_none_of_them():
    code = ("import sys; from peftkit.utils.registry import QUANTIZERS; names = QUANTIZERS.names(); "
            "QUANTIZERS.help('gptq'); "
            "print(len(names), sorted(m for m in sys.modules if m.startswith('peftkit.quant.quantizers.')), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["6", "[]", "False"]


def test_the_pipeline_hands_every_block_to_the_registered_quantizer(monkeypatch):
    from peftkit.quant.pipeline import quantize_model
    from peftkit.quant.quantizers import Quantizer

    seen = []

    class Probe(Quantizer):
        name = "probe"
        calibrated = True

        def quantize_block(self, work):
            seen.append((work.index, sorted(work.qlinears), tuple(work.x_q.shape), sorted(work.kwargs)))
            return {name: q.freeze() for name, q in work.qlinears.items()}, []

    QUANTIZERS.names()  # the index is read before it is extended
    monkeypatch.setitem(QUANTIZERS._found, "probe", (__name__, "a test quantizer"))
    monkeypatch.setitem(QUANTIZERS._entries, "probe", Entry("probe", Probe, "a test quantizer", __name__))
    result = quantize_model(structured_llama(), options("probe", bits=2), windows(4, 16), log=lambda s: None)
    assert [s[0] for s in seen] == [0, 1] and result.method == "probe"
    assert seen[0][1] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                          "self_attn.q_proj", "self_attn.v_proj"]
    assert seen[0][2] == (4, 16, 64) and "position_embeddings" in seen[0][3]


def test_a_recipe_and_the_quant_bench_accept_exactly_the_registered_quantizers():
    import pytest
    from pydantic import ValidationError

    from peftkit.bench.quant import QuantSettings
    from peftkit.config.schema import QuantArgs

    for name in QUANTIZERS.names():
        assert QuantArgs(method=name).method == name and QuantSettings(methods=[name]).methods == [name]
    with pytest.raises(ValidationError, match='unknown quantizer "apiq_bw" \\(did you mean "apiq-bw"\\?\\); known: apiq-bw'):
        QuantArgs(method="apiq_bw")
    with pytest.raises(ValidationError, match='unknown quantizer "awq"'):
        QuantSettings(methods=["rtn", "awq"])
