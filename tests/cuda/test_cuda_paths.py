"""The CUDA / bf16 paths: the same invariants as the CPU tests, on a GPU (skipped where there is none).

CI has no GPU, so these run on a lent GPU machine (see docs/RESULTS.md, section cuda-check); each test
compares the GPU result with its CPU or autograd reference, so a device or dtype mistake fails it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def test_meft_reversible_gradients_and_dropout_replay_on_cuda():
    from methods.test_meft import assert_same_grads, batch_of, grads_of, make

    for variant in ("meft1", "meft2", "meft3"):
        model = make(variant).to(CUDA).train()  # fp64, dropout 0.1: the CUDA generator must be replayed
        batch = {k: v.to(CUDA) for k, v in batch_of(model).items()}
        reversible = grads_of(model, batch, True)
        plain = grads_of(model, batch, False)
        assert_same_grads(model, reversible, plain, rtol=1e-6)
        other = grads_of(model, batch, False, seed=8)
        assert any(not torch.allclose(other[n], plain[n]) for n in plain), "dropout must be active"


def test_pafi_frozen_entries_bit_identical_after_adamw_on_cuda():
    from helpers.tiny import tiny_bert

    from peftkit.methods import create_method

    method = create_method("pafi")
    base = tiny_bert().to(CUDA)
    model = create_method("pafi", rho=0.05).prepare(copy.deepcopy(base))
    optimizer = torch.optim.AdamW(method.param_groups(model, 0.1), lr=1e-2)
    ids = torch.randint(5, 64, (4, 10), device=CUDA)
    for _ in range(3):
        model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1], device=CUDA)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = method.merge(model).state_dict()
    changed = 0
    for name, before in base.state_dict().items():
        if "classifier" in name or "pooler" in name:
            continue
        diff = (merged[name] != before).sum().item()
        changed += diff
    total = sum(p.numel() for n, p in base.named_parameters() if p.dim() == 2 and "layer." in n)
    assert 0 < changed <= round(0.05 * total)  # only the rho fraction moved, on the GPU as on the CPU


@pytest.mark.parametrize("method", ["rtn", "nf", "loftq", "apiq-bw"])
def test_quantize_on_cuda_matches_cpu(method):
    from helpers.quant import options, structured_llama, windows

    from peftkit.quant.pipeline import build_quantized_model, quantize_model

    fp = structured_llama()
    calib = windows(n=4, length=16)
    opts = options(method=method, bits=3, epochs=1)
    cpu = quantize_model(copy.deepcopy(fp), opts, calib if method.startswith("apiq") else None, log=lambda s: None)
    gpu = quantize_model(copy.deepcopy(fp).to(CUDA), opts, calib.to(CUDA) if method.startswith("apiq") else None,
                         log=lambda s: None)
    for name, q in cpu.weights.items():
        w_cpu, w_gpu = q.dequantize(), gpu.weights[name].dequantize().cpu()
        if method == "apiq-bw":  # calibrated: float reductions differ by device, so the codes may differ a little
            assert ((w_gpu - w_cpu).norm() / w_cpu.norm()).item() < 0.05, name
        else:
            assert torch.allclose(w_gpu, w_cpu, atol=1e-5), name
    model = build_quantized_model(copy.deepcopy(fp).to(CUDA), gpu)
    assert next(model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["lora", "pafi", "hiwi", "meft1"])
def test_finetune_trains_on_cuda_in_fp32_and_bf16(method, dtype, tiny_run_setup, tmp_path):
    from peftkit.commands.train import finetune

    recipe = tiny_run_setup(method=method, out=f"{method}-{dtype}", max_steps=8, lr=5e-3)
    recipe["model"]["dtype"] = dtype
    run_dir = finetune(recipe, [])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["accuracy"] >= 0.0
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert log and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_memory_child_reports_cuda_peak():
    from peftkit.bench.memory import peak_memory_in_fresh_process

    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "vocab_size": 128, "max_position_embeddings": 64}
    spec = {"model": "config", "config": config, "batch": 4, "seq": 32, "steps": 1, "threads": 1, "device": "cuda"}
    full = peak_memory_in_fresh_process({**spec, "method": "full"})
    meft = peak_memory_in_fresh_process({**spec, "method": "meft1"})
    assert full["peak_cuda_bytes"] > 0 and meft["peak_cuda_bytes"] > 0
