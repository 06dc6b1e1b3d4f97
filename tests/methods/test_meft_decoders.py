"""MEFT (reversible) on pre-norm decoders: tiny LLaMA (RMSNorm, rotary) and OPT (LayerNorm, learned positions)
causal LMs, against the base model and against a straight-line implementation of docs/methods/meft.md's decoder
equations written here from the weights."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny import tiny_llama
from test_meft import grads_of

from peftkit.bench.memory import saved_tensor_bytes
from peftkit.errors import UserError
from peftkit.methods import create_method
from peftkit.methods.meft import meft_encoder_of

VARIANTS = ("meft1", "meft2", "meft3")
FAMILIES = ("llama", "opt")


def tiny_opt(seed: int = 0, layers: int = 2, hidden: int = 64, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    base = dict(vocab_size=128, hidden_size=hidden, ffn_dim=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=hidden, dropout=0.0, pad_token_id=1)
    base.update(kw)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("opt", **base))


def base_model(family, layers=3, init_range=0.2, dtype=torch.float64, **kw):
    """init_range 0.2 makes every layer change the hidden state substantially (at 0.02 the blocks are near the
    identity and closeness checks would pass trivially)."""
    make = tiny_llama if family == "llama" else tiny_opt
    return make(layers=layers, initializer_range=init_range, **kw).to(dtype)


def prepare(variant, base, **options):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny factors in the limit test make the rounding warning fire
        return create_method(variant, **options).prepare(copy.deepcopy(base))


def batch_of(size=3, length=10, seed=1, pad=True):
    """Right-padded rows (the mask must reach every block); labels ignore the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (size, length), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, length - 3:] = 0
        mask[2, length - 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def zero_adapters(model):
    with torch.no_grad():
        for p in meft_encoder_of(model).adapters.parameters():
            p.zero_()


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---- (1) the starting point ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_adapters_and_vanishing_extra_residual_give_the_base_logits(variant, family):
    """With the adapters at zero, the only difference to the base model is the lam/beta-scaled extra residual the
    coupling adds; as it goes to zero the MEFT model IS the base model (masks, positions, final norm and head all
    wired as the base model's forward wires them), for every position of padded rows."""
    base = base_model(family).eval()
    eps = {"meft1": {"lambda_factor": 1e-12}, "meft2": {"beta_factor": 1e-12},
           "meft3": {"lambda_factor": 1e-12, "beta_factor": 1e-12}}[variant]
    model = prepare(variant, base, stream_arithmetic="float", **eps).eval()  # 1e-12 is no small fraction
    zero_adapters(model)
    batch = batch_of()
    want, got = logits(base, batch), logits(model, batch)
    valid = batch["attention_mask"].bool()
    assert torch.allclose(got[valid], want[valid], rtol=0, atol=1e-9 * want.abs().max().item())


def _gap(model, base, batch):
    """Relative distance of the logits to the base model's (centred per token), over the valid tokens."""
    valid = batch["attention_mask"].bool()
    want, got = logits(base, batch)[valid], logits(model, batch)[valid]
    want_c = want - want.mean(-1, keepdim=True)
    return ((got - want).norm() / want_c.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_factors_keep_the_starting_point_close(family):
    """At the variants' own lam/beta and zero adapters the logits stay near the base model's (the 0.1-scaled extra
    residual is all that differs); with lam = beta = 1 they move far; reading the head off the pretrained stream
    (merge_weight 0) is closer than the mean of the streams (merge_weight 1: the final norm ignores the factor 2)."""
    base = base_model(family, layers=4).eval()
    batch = batch_of()
    for variant, bound in (("meft1", 0.15), ("meft2", 0.15), ("meft3", 0.3)):
        model = prepare(variant, base).eval()
        zero_adapters(model)
        near = _gap(model, base, batch)
        with torch.no_grad():
            meft_encoder_of(model).merge_weight.fill_(1.0)
        mean_merge = _gap(model, base, batch)
        far_model = prepare(variant, base, lambda_factor=1.0, beta_factor=1.0).eval()
        zero_adapters(far_model)
        far = _gap(far_model, base, batch)
        assert near < bound and far > 2 * near, (variant, near, far)
        if variant != "meft3":
            assert mean_merge > 2 * near, (variant, near, mean_merge)


# ---- (2) an independent straight-line implementation of the documented equations -------------------------------
def _causal_additive_mask(mask, dtype):
    t = mask.shape[1]
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool)) & mask[:, None, :].bool()  # (b, q, k)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))[:, None]


def _attend(q, k, v, additive):
    probs = torch.softmax(q @ k.transpose(-1, -2) + additive, dim=-1)
    return (probs @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _adapter(weights, x):
    down_w, down_b, up_w, up_b, act = weights
    return F.linear(act(F.linear(x, down_w, down_b)), up_w, up_b)


def _llama_pieces(model, batch):
    """Per layer: attention(N1 input) and mlp(N2 input) from the raw weights, plus N1, N2, the final norm, the head."""
    cfg, sd = model.config, {k: v for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d_head = cfg.hidden_size // heads
    t = batch["input_ids"].shape[1]

    def rms(x, w):
        return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    # the rotary angles in float32, as LLaMA computes them whatever the model's dtype
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head))
    angles = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().double(), angles.sin().double()

    def rotate(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    additive = _causal_additive_mask(batch["attention_mask"], torch.float64)
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."

        def attn(x, p=p):
            b = x.shape[0]
            q = F.linear(x, sd[p + "self_attn.q_proj.weight"]).view(b, t, heads, d_head).transpose(1, 2)
            k = F.linear(x, sd[p + "self_attn.k_proj.weight"]).view(b, t, kv_heads, d_head).transpose(1, 2)
            v = F.linear(x, sd[p + "self_attn.v_proj.weight"]).view(b, t, kv_heads, d_head).transpose(1, 2)
            rep = heads // kv_heads
            q, k = rotate(q) / math.sqrt(d_head), rotate(k).repeat_interleave(rep, 1)
            return F.linear(_attend(q, k, v.repeat_interleave(rep, 1), additive), sd[p + "self_attn.o_proj.weight"])

        def mlp(x, p=p):
            gate, up = F.linear(x, sd[p + "mlp.gate_proj.weight"]), F.linear(x, sd[p + "mlp.up_proj.weight"])
            return F.linear(F.silu(gate) * up, sd[p + "mlp.down_proj.weight"])

        layers.append((lambda x, p=p: rms(x, sd[p + "input_layernorm.weight"]), attn,
                       lambda x, p=p: rms(x, sd[p + "post_attention_layernorm.weight"]), mlp))
    embed = sd["model.embed_tokens.weight"][batch["input_ids"]]
    return embed, layers, lambda x: rms(x, sd["model.norm.weight"]), sd["lm_head.weight"], "model.adapters.", F.silu


def _opt_pieces(model, batch):
    cfg, sd = model.config, model.state_dict()
    heads, d = cfg.num_attention_heads, cfg.hidden_size
    d_head, t = d // heads, batch["input_ids"].shape[1]
    mask = batch["attention_mask"]
    additive = _causal_additive_mask(mask, torch.float64)

    def ln(x, name):
        return F.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"])

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.decoder.layers.{i}."

        def attn(x, p=p):
            b = x.shape[0]

            def proj(n):
                return F.linear(x, sd[p + f"self_attn.{n}.weight"], sd[p + f"self_attn.{n}.bias"])
            q = (proj("q_proj") * d_head ** -0.5).view(b, t, heads, d_head).transpose(1, 2)
            k, v = (proj(n).view(b, t, heads, d_head).transpose(1, 2) for n in ("k_proj", "v_proj"))
            return F.linear(_attend(q, k, v, additive), sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"])

        def mlp(x, p=p):
            return F.linear(F.relu(F.linear(x, sd[p + "fc1.weight"], sd[p + "fc1.bias"])), sd[p + "fc2.weight"], sd[p + "fc2.bias"])

        layers.append((lambda x, p=p: ln(x, p + "self_attn_layer_norm"), attn,
                       lambda x, p=p: ln(x, p + "final_layer_norm"), mlp))
    positions = (torch.cumsum(mask, 1) * mask - 1).long() + 2  # OPT's learned positions start at offset 2
    embed = sd["model.decoder.embed_tokens.weight"][batch["input_ids"]] + sd["model.decoder.embed_positions.weight"][positions]
    return (embed, layers, lambda x: ln(x, "model.decoder.final_layer_norm"), sd["lm_head.weight"],
            "model.decoder.adapters.", F.relu)


def reference_logits(model, variant, lam, beta, batch):
    """docs/methods/meft.md, decoders, from the weights alone:
        A(x) = x + o + Aatt(o), o = attn(N1(x))          (Aatt: meft3 only)
        M(a) = a + mlp(N2(a)) + Affn(N2(a))
        meft1: F = M(A(x)), G = Ag;  meft2: F = Af, G = M(A(y));  meft3: F = A, G = M
        y1 = lam·x1 + F(x2),  y2 = beta·x2 + G(y1),  swap for meft1/2
        logits = head(final_norm(x_p + w·x_o)), x_p the stream holding the last pretrained sub-block's output."""
    family = model.config.model_type
    embed, layers, final_norm, head, prefix, act = (_llama_pieces if family == "llama" else _opt_pieces)(model, batch)
    sd = model.state_dict()

    def adapter(i, name):
        p = f"{prefix}{i}.{name}."
        return (sd[p + "down.weight"], sd[p + "down.bias"], sd[p + "up.weight"], sd[p + "up.bias"], act)

    x1 = x2 = embed
    for i, (n1, attn, n2, mlp) in enumerate(layers):
        def A(x, att=None):
            o = attn(n1(x))
            return x + o + (_adapter(att, o) if att else 0)

        def M(a, ffn=None):
            h = n2(a)
            return a + mlp(h) + (_adapter(ffn, h) if ffn else 0)

        if variant == "meft1":
            f, g = (lambda x: M(A(x), adapter(i, "ffn"))), (lambda y: _adapter(adapter(i, "g"), y))
        elif variant == "meft2":
            f, g = (lambda x: _adapter(adapter(i, "f"), x)), (lambda y: M(A(y), adapter(i, "ffn")))
        else:
            f, g = (lambda x: A(x, adapter(i, "attention"))), (lambda y: M(y, adapter(i, "ffn")))
        y1 = lam * x1 + f(x2)
        y2 = beta * x2 + g(y1)
        x1, x2 = (y2, y1) if variant in ("meft1", "meft2") else (y1, y2)
    pretrained, other = (x2, x1) if variant in ("meft1", "meft3") else (x1, x2)
    w = sd[prefix.replace("adapters.", "merge_weight")]
    return F.linear(final_norm(pretrained + w * other), head)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_the_straight_line_equations(variant, family):
    base = base_model(family).eval()
    model = prepare(variant, base, init_std=0.3).eval()  # adapters far from zero: their placement matters
    with torch.no_grad():
        meft_encoder_of(model).merge_weight.fill_(0.4)
    batch = batch_of()
    decoder = meft_encoder_of(model)
    want = reference_logits(model, variant, decoder.lam, decoder.beta, batch)
    got = logits(model, batch)
    valid = batch["attention_mask"].bool()
    assert (want[valid] - logits(base, batch)[valid]).abs().max() > 1e-2  # the adapters do change the output
    # LLaMA's RMSNorm and rotary tables run in float32 whatever the model's dtype (about 1e-7 relative); OPT is fp64
    tol = 1e-5 if family == "llama" else 1e-9
    assert (got[valid] - want[valid]).abs().max() < tol * want.abs().max()


# ---- (3) reversible backward vs plain autograd ---------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arithmetic,tolerance", [("float", 1e-6), ("fixed", 1e-5)])
def test_reversible_gradients_equal_autograd(variant, family, arithmetic, tolerance):
    """fp64; OPT with its residual dropout active (the masks are replayed in the recomputation). Fixed-point streams
    round the forward to 2^-32, coarser than fp64: their gradients differ from fp64 autograd's by ~1e-6."""
    extra = {"dropout": 0.1} if family == "opt" else {}
    model = prepare(variant, base_model(family, **extra), init_std=0.1, stream_arithmetic=arithmetic)
    with torch.no_grad():
        meft_encoder_of(model).merge_weight.fill_(0.3)
    model.train()
    batch = batch_of()
    got, want = grads_of(model, batch, True), grads_of(model, batch, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want) == trainable
    assert any(n.endswith("merge_weight") for n in trainable) and all(".adapters." in n or n.endswith("merge_weight")
                                                                       for n in trainable)
    for name in trainable:
        err = ((got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-30)).item()
        assert err < tolerance, f"{name}: relative gradient error {err:.2e}"
    if family == "opt":  # another dropout seed draws other masks, so the agreement above is not by luck
        other = grads_of(model, batch, False, seed=8)
        assert any((other[n] - want[n]).norm() > 1e-3 * want[n].norm() for n in trainable)


# ---- (4) activation memory flat in depth ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_bytes_do_not_grow_with_depth(family):
    batch = batch_of(size=2, length=32, pad=False)

    def saved(method, layers):
        base = base_model(family, layers=layers, init_range=0.02, dtype=torch.float32)
        model = prepare(method, base) if method.startswith("meft") else create_method(method).prepare(base)
        return saved_tensor_bytes(model.train(), batch)

    full_2, full_8 = saved("full", 2), saved("full", 8)
    assert full_8 > 2.5 * full_2
    for variant in VARIANTS:
        shallow, deep = saved(variant, 2), saved(variant, 8)
        assert deep < 1.5 * shallow and deep < full_8 / 4, (variant, shallow, deep, full_8)


# ---- options and refusals ----------------------------------------------------------------------------------------
def test_decoder_refusals_are_user_errors():
    with pytest.raises(UserError, match="post-LayerNorm"):
        prepare("meft1", tiny_opt(do_layer_norm_before=False))
    with pytest.raises(UserError, match="num_rev_layers"):
        prepare("meft1", tiny_llama(layers=2), num_rev_layers=3)
    model = prepare("meft2", tiny_llama(layers=2))
    with pytest.raises(UserError, match="already prepared"):
        create_method("meft2").prepare(model)
    with pytest.raises(UserError, match="bare decoder"):
        prepare("meft1", tiny_llama(layers=2).model)


def test_save_load_restores_adapters_and_merge_weight(tmp_path):
    base = base_model("llama")
    method = create_method("meft3", init_std=0.1)
    model = prepare("meft3", base, init_std=0.1).eval()
    with torch.no_grad():
        meft_encoder_of(model).merge_weight.fill_(0.25)
    method.save(model, tmp_path)
    fresh = create_method("meft3").load(copy.deepcopy(base), tmp_path).eval()
    batch = batch_of()
    assert torch.equal(logits(model, batch), logits(fresh, batch))
    assert meft_encoder_of(fresh).merge_weight.item() == 0.25


# ---- (5) the run pipeline on a causal-LM task ----------------------------------------------------------------
def test_finetune_trains_a_tiny_llama_and_eval_reloads_it(tmp_path):
    import yaml
    from helpers.quant import write_model_dir, write_wikitext

    from peftkit.commands.evaluate import evaluate
    from peftkit.commands.train import finetune

    model_dir = write_model_dir(tmp_path / "llama")
    data = write_wikitext(tmp_path / "wt", words=1200)
    recipe = {"model": {"name": str(model_dir), "task_head": "causal_lm"},
              "data": {"task": "wikitext2", "root": str(data), "max_length": 32, "eval_limit": 6},
              "method": {"name": "meft1", "r": 8},
              "train": {"max_steps": 12, "batch_size": 4, "lr": 1e-2, "seed": 3, "log_every": 4, "warmup_ratio": 0.0,
                        "threads": 1},
              "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "meft1.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = finetune(str(path), [])
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["method"] == "meft1" and m["steps"] == 12
    assert m["ppl"] < m["ppl_start"], m
    assert 0 < m["trainable_pct"] < 10
    again = evaluate("wikitext2", str(run_dir), data_root=str(data), seq_len=32, max_windows=6)["rows"][0]
    assert again["ppl"] == pytest.approx(m["ppl"], rel=1e-5)  # the saved adapters reload onto a fresh base
