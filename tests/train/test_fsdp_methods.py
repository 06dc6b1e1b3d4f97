"""FSDP2 (train.strategy=fsdp) for every PEFT method: two gloo processes under torchrun against one plain process on
the same global batches (fsdp_methods_worker.py), plus the finetune and pretrain commands under torchrun with fsdp.

Tolerances: global losses within 1e-5 (relative) and final method state within 1e-5 (rtol) / 5e-6 (atol): one process
and two compute the same sums with their rows split differently, which only moves the last bits (measured: 5e-7 at
most, on losses and weights, on an AMX machine; the margin is for other kernels). BERT's attention
key biases are the exception: their exact gradient is zero (softmax ignores a shift shared by every key), so their
gradients are rounding noise that AdamW turns into steps of up to lr each; they are held to STEPS x lr."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _losses, _torchrun

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
WORKER = HERE / "fsdp_methods_worker.py"
METHODS = ("lora", "pafi", "hiwi", "bitfit", "supertuning", "meft1", "apiq")
NOISE_ONLY = "attention.self.key.bias"  # exact gradient zero: see the module docstring
LR, STEPS = 2e-3, 4  # as in the worker


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every method trained by two FSDP processes (one torchrun) and by one plain process, at the same time."""
    from helpers.quant import options, structured_llama, windows

    from peftkit.quant.checkpoint import save_quantized
    from peftkit.quant.pipeline import quantize_model

    out = tmp_path_factory.mktemp("fsdp-methods")
    quant_dir = out / "quantized"
    model = structured_llama()
    save_quantized(quant_dir, model, quantize_model(model, options("rtn", bits=4, group_size=32), windows(4),
                                                    log=lambda s: None))
    labels = ",".join((*METHODS, "lora-bf16-offload", "apiq-bf16"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.Popen([sys.executable, str(WORKER), str(out), str(quant_dir), ",".join(METHODS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sharded = _torchrun(str(WORKER), str(out), str(quant_dir), labels)
    _, single_err = single.communicate(timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    assert single.returncode == 0, single_err[-4000:]
    return out


def _result(out: Path, label: str, world: int) -> tuple[dict, dict]:
    return (json.loads((out / f"{label}-w{world}.json").read_text()),
            load_file(str(out / f"{label}-w{world}.safetensors")))


@pytest.mark.parametrize("label", METHODS)
def test_two_fsdp_processes_match_one_process(runs, label):
    (one, one_state), (two, two_state) = _result(runs, label, 1), _result(runs, label, 2)
    assert len(two["losses"]) == STEPS
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two_state.keys() == one_state.keys() and two_state
    for key, tensor in one_state.items():
        atol = STEPS * LR if NOISE_ONLY in key else 5e-6
        torch.testing.assert_close(two_state[key], tensor, rtol=1e-5, atol=atol, msg=key)


@pytest.mark.parametrize("label", METHODS)
def test_each_fsdp_process_holds_half_the_parameters(runs, label):
    """Parameters and buffers together: buffers (position ids, PaFi's indices) are replicated and small; the packed
    base of apiq, were it left in buffers, would put a process at 63%."""
    two, _ = _result(runs, label, 2)
    for held in two["held_bytes_by_rank"]:
        assert 0.45 * two["whole_bytes"] <= held <= 0.56 * two["whole_bytes"], (held, two["whole_bytes"])


@pytest.mark.parametrize("label", METHODS)
def test_fsdp_resumes_bit_identically_and_gathers_the_final_model(runs, label):
    two, _ = _result(runs, label, 2)
    assert two["resume_equal"], "resumed from step 2, the method state differs from the uninterrupted run's"
    assert two["resumed_losses"] == two["losses"][2:]
    assert two["final_equal"], "the gathered model state, loaded into a fresh model, gives another method state"
    assert two["reload_equal"], "a checkpoint loaded after an evaluation (select_best) did not stay loaded"


def test_fsdp_mixed_precision_leaves_packed_weights_as_stored(runs):
    """Under a bf16 policy the quantized base still computes with its float16 GPTQ scales: the packed Linears are
    units of their own that the policy does not cast, while LoRA and the rest run in bfloat16."""
    (fp32, _), (mixed, _) = _result(runs, "apiq", 2), _result(runs, "apiq-bf16", 2)
    assert fp32["packed_dtypes"] == mixed["packed_dtypes"] == ["torch.float16"]
    assert mixed["losses"] != fp32["losses"]
    assert mixed["losses"] == pytest.approx(fp32["losses"], abs=2e-2)
    assert mixed["resume_equal"] and mixed["final_equal"] and mixed["reload_equal"]


def test_fsdp_mixed_precision_and_cpu_offload(runs):
    """bf16 gathering with float32 reduction keeps float32 sharded parameters and follows the float32 losses at
    bf16 resolution; CPU offload changes where the shards live, not what is computed."""
    (fp32, _), (mixed, _) = _result(runs, "lora", 2), _result(runs, "lora-bf16-offload", 2)
    assert mixed["dtypes"] == ["torch.float32"]
    assert mixed["losses"] != fp32["losses"]  # the forward really ran in bfloat16
    assert mixed["losses"] == pytest.approx(fp32["losses"], abs=2e-2)
    assert mixed["resume_equal"] and mixed["final_equal"]


def test_finetune_command_with_fsdp_writes_the_gathered_method_state(tiny_run_setup, tmp_path):
    """The run pipeline under FSDP for a parametrized method (PaFi): final/ holds the method state of the last step
    (the step-4 checkpoint's, gathered whole), written once by rank 0."""
    import yaml

    recipe = tiny_run_setup("pafi", out="fsdp", max_steps=4, save_every=4, eval_every=4, strategy="fsdp")
    recipe["train"].update(select_best=False)
    recipe["method"].update(rho=0.02)
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = _torchrun("-m", "peftkit", "finetune", str(path), cwd=str(ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "fsdp"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4 and len(_losses(run)) == 4
    assert result.stdout.count("final sst2") == 1
    checkpoint = load_file(str(run / "checkpoints" / "step-000004" / "trainable.safetensors"))
    final = load_file(str(run / "final" / "adapter.safetensors"))
    values = [k for k in checkpoint if k.endswith("values")]
    assert values and all(k in final for k in values)
    for key in values:
        torch.testing.assert_close(final[key], checkpoint[key], rtol=0, atol=0, msg=key)


def test_pretrain_command_with_fsdp(tmp_path):
    """peftkit pretrain goes through the same Trainer: FSDP shards the pretraining model's blocks (found by its
    layer lists, no family describes it) and the run writes final/ once."""
    import yaml
    from helpers.tiny import WORDS
    from transformers import AutoModelForMaskedLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(WORDS[(7 * line + 3 * k) % len(WORDS)] for k in range(10)) + "\n"
                              for line in range(200)))
    data = {"files": [str(corpus)], "block_size": 32, "eval_files": [str(corpus)], "eval_limit": 4}
    recipe = {"kind": "pretrain", "model": {"preset": "tiny", "vocab_size": 300}, "data": data,
              "mlm": {"variant": "3ml-cross", "full_length_layers": 1}, "output": {"dir": str(tmp_path / "run")},
              "train": {"batch_size": 4, "max_steps": 3, "log_every": 1, "strategy": "fsdp"}}
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = _torchrun("-m", "peftkit", "pretrain", str(path), cwd=str(ROOT),
                       env={"PEFTKIT_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3 and len(_losses(run)) == 3
    assert result.stdout.count("saved") == 1
    _, info = AutoModelForMaskedLM.from_pretrained(run / "final", output_loading_info=True)  # whole, not shards
    assert not info["missing_keys"] and not info["mismatched_keys"], info


def test_blocks_of_a_model_no_family_describes():
    """FSDP's per-block units for a pretraining model: the blocks of its encoder and of its cross decoder, each a
    unit, not the whole model as one."""
    from helpers.pretrain import tiny_config

    from peftkit.pretrain.model import MaskedLMPretrainer
    from peftkit.train.distributed import blocks_of

    model = MaskedLMPretrainer(tiny_config(layers=3), variant="3ml-cross", full_length_layers=1, decoder_layers=2)
    blocks = blocks_of(model)
    assert blocks == [*model.mlm.roberta.encoder.layer, *model.decoder.layers]
