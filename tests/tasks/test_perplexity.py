"""WikiText-2 perplexity: non-overlapping windows, no BOS inserted, nll averaged over every predicted token."""

import math

import pytest
import torch
from helpers.quant import structured_llama, write_model_dir, write_wikitext  # noqa: E402

from peftkit.commands.evaluate import evaluate  # noqa: E402
from peftkit.tasks.causal_lm import evaluate_perplexity  # noqa: E402


def _tokenizer(tmp_path):
    from helpers.tiny import tiny_bert_tokenizer

    return tiny_bert_tokenizer(tmp_path / "tok")


def test_equals_exp_of_the_mean_token_nll_computed_independently(tmp_path):
    tok = _tokenizer(tmp_path)
    model = structured_llama()
    text = (write_wikitext(tmp_path / "wt", words=300) / "wiki.test.raw").read_text()
    out = evaluate_perplexity(model, tok, text, seq_len=20, max_windows=5)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.cls_token_id not in ids[:100]  # no special tokens in the stream
    # independent computation: log-softmax by hand, token by token
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(5):
            window = torch.tensor(ids[w * 20:(w + 1) * 20])
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), -1)
            for t in range(19):
                nll -= logp[t, window[t + 1]].item()
                count += 1
    assert out["tokens"] == count == 5 * 19 and out["windows"] == 5 and out["seq_len"] == 20
    assert out["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_window_count_is_capped_by_the_text(tmp_path):
    tok = _tokenizer(tmp_path)
    text = " ".join(["the cat sat on the mat"] * 10)  # 60 tokens
    out = evaluate_perplexity(structured_llama(), tok, text, seq_len=16)
    assert out["windows"] == 3 and out["tokens"] == 3 * 15


def test_run_on_a_model_dir_and_on_a_quantize_output_dir(tmp_path):
    from helpers.quant import options

    from peftkit.quant.checkpoint import save_quantized
    from peftkit.quant.pipeline import quantize_model

    model_dir = write_model_dir(tmp_path / "model")
    data = write_wikitext(tmp_path / "wt", words=400)
    fp = evaluate("wikitext2", str(model_dir), data_root=str(data), seq_len=32, max_windows=3)["rows"][0]
    assert fp["windows"] == 3 and fp["task"] == "wikitext2" and fp["ppl"] > 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result = quantize_model(model, options("rtn", bits=None), None, log=lambda s: None)
    save_quantized(tmp_path / "q16", model, result, AutoTokenizer.from_pretrained(model_dir))
    q16 = evaluate("wikitext2", str(tmp_path / "q16"), data_root=str(data), seq_len=32, max_windows=3)["rows"][0]
    # not quantized, B = 0: the FP model, up to its float16 storage (GPTQ checkpoints store unpacked tensors in float16)
    assert q16["ppl"] == pytest.approx(fp["ppl"], rel=1e-4) and q16["ppl"] != fp["ppl"]


def test_eval_on_a_fine_tuned_adapter_dir_and_json(tmp_path, capsys):
    """A peft adapter saved on a quantized base (what a fine-tuned apiq run stores) finds its base again."""
    import json

    from helpers.quant import options, windows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.commands.evaluate import evaluate
    from peftkit.quant.checkpoint import load_quantized, save_quantized
    from peftkit.quant.pipeline import quantize_model

    model_dir = write_model_dir(tmp_path / "model")
    data = write_wikitext(tmp_path / "wt", words=400)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result = quantize_model(model, options("apiq-bw", bits=2, epochs=1), windows(4), log=lambda s: None)
    save_quantized(tmp_path / "q", model, result, AutoTokenizer.from_pretrained(model_dir))
    tuned = load_quantized(tmp_path / "q", is_trainable=True)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    rows = evaluate("wikitext2", [str(tmp_path / "q"), str(tmp_path / "tuned")], data_root=str(data), seq_len=32,
                    max_windows=2, json_path=str(tmp_path / "p.json"))["rows"]
    assert rows[0]["ppl"] != rows[1]["ppl"] and all(r["windows"] == 2 for r in rows)
    assert json.loads((tmp_path / "p.json").read_text())["rows"][1]["model"] == str(tmp_path / "tuned")
    assert "ppl" in capsys.readouterr().out
