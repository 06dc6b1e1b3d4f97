"""The structure read from a model against facts written by hand from each architecture's definition."""

from __future__ import annotations

import pytest

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128)
SIZES = {
    "bert": {}, "roberta": dict(pad_token_id=1), "xlm-roberta": dict(pad_token_id=1), "deberta-v2": {},
    "distilbert": dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4),
    "modernbert": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                       global_attn_every_n_layers=1),
    "llama": dict(num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 64}),
    "mistral": dict(num_key_value_heads=2), "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=16), "gemma": dict(num_key_value_heads=2, head_dim=16),
    "gemma2": dict(num_key_value_heads=2, head_dim=16), "phi3": dict(num_key_value_heads=2, pad_token_id=0),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64), "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
}
LLAMA_LIKE = (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "pre", False, False, True)
BERT_LIKE = (("query", "key", "value", "dense"), "post", False, False, False)
# leaf names, norm position, fused qkv, fused gate/up, gated MLP: from each family's modeling file
EXPECTED = {
    "bert": BERT_LIKE, "roberta": BERT_LIKE, "xlm-roberta": BERT_LIKE,
    "deberta-v2": (("query_proj", "key_proj", "value_proj", "dense"), "post", False, False, False),
    "distilbert": (("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"), "post", False, False, False),
    "modernbert": (("Wqkv", "Wo", "Wi"), "pre", True, True, True),
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": LLAMA_LIKE, "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "phi3": (("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "pre", True, True, True),
    "opt": (("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "pre", False, False, False),
    "gpt2": (("c_attn", "c_proj", "c_fc"), "pre", True, False, False),
}
BERT_WRITERS = {"attention.output.dense", "output.dense"}
WRITERS = {
    "bert": BERT_WRITERS, "roberta": BERT_WRITERS, "xlm-roberta": BERT_WRITERS, "deberta-v2": BERT_WRITERS,
    "distilbert": {"attention.out_lin", "ffn.lin2"}, "modernbert": {"attn.Wo", "mlp.Wo"},
    "llama": {"self_attn.o_proj", "mlp.down_proj"}, "opt": {"self_attn.out_proj", "fc2"},
    "gpt2": {"attn.c_proj", "mlp.c_proj"},
}
# the projections' biases: (attention, MLP), all or none, except Qwen2's q/k/v with biases and o without
BIASES = {"modernbert": (False, False), "llama": (False, False), "mistral": (False, False), "qwen3": (False, False),
          "gemma": (False, False), "gemma2": (False, False), "phi3": (False, False)}


def build(family: str, head: str = "seq_cls"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**COMMON, **SIZES[family]})
    auto = AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM
    return auto.from_config(config)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_structure_is_read_from_the_model(family):
    from peftkit.models.structure import structure_of

    model = build(family)
    found = structure_of(model)
    leaves, norm, fused_qkv, fused_gate_up, gated = EXPECTED[family]
    assert found.linear_leaf_names == leaves
    assert (found.norm_position, found.fused_qkv, found.fused_gate_up, found.gated_mlp) == (norm, fused_qkv,
                                                                                          fused_gate_up, gated)
    assert found.num_layers == 2 and found.hidden_size == 64
    # the layer list found is the model's own: every projection path resolves in every block
    blocks = model.get_submodule(found.layers_path)
    assert len(blocks) == 2
    for block in blocks:
        for p in found.projections:
            weight = block.get_submodule(p.path).weight
            assert tuple(weight.shape) == ((p.in_features, p.out_features) if p.transposed
                                           else (p.out_features, p.in_features))
    if family == "qwen2":
        assert [p.bias for p in found.of_side("attention")] == [True, True, True, False]
    elif family in BIASES:
        assert (any(p.bias for p in found.of_side("attention")), found.mlp_biases) == BIASES[family]
    else:
        assert all(p.bias for p in found.projections) and found.mlp_biases
    # the output-side projections, which write into the residual stream; the rest read it
    assert {p.path for p in found.projections if not p.reads_stream} == WRITERS.get(family, WRITERS["llama"])


@pytest.mark.parametrize("family,tied", [("llama", False), ("gemma", True), ("gpt2", True), ("opt", True)])
def test_tied_embeddings_are_read_from_the_tensors(family, tied):
    from peftkit.models.structure import structure_of

    model = build(family, head="causal_lm")
    if family == "llama":
        assert model.config.tie_word_embeddings is False or model.lm_head.weight is not model.model.embed_tokens.weight
    assert structure_of(model).tied_embeddings is (model.get_output_embeddings().weight
                                                    is model.get_input_embeddings().weight)
    assert structure_of(model).tied_embeddings is tied


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_the_structure_read_from_a_config_alone_is_the_loaded_model_s(family):
    """structure_from_config builds a shrunken random model (two blocks, width 64) from the config: what it reads is
    what the full model shows, so a checkpoint is judged from its config.json before any weight loads."""
    from transformers import AutoConfig, AutoModel

    from peftkit.models.structure import structure_from_config, structure_of

    config = AutoConfig.for_model(family, **{**COMMON, **SIZES[family]})
    config.hidden_size, config.num_hidden_layers = 96, 3  # through each config's attribute_map (n_embd, dim, ...)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:1] * 3
    loaded = structure_of(AutoModel.from_config(config))
    shrunk = structure_from_config(config)
    assert shrunk.hidden_size == 64 and shrunk.num_layers == 2
    assert (shrunk.layers_path, shrunk.linear_leaf_names, shrunk.norm_position, shrunk.fused_qkv, shrunk.fused_gate_up,
            shrunk.gated_mlp, shrunk.causal, shrunk.run_order, shrunk.final_norm_path) == (
        loaded.layers_path, loaded.linear_leaf_names, loaded.norm_position, loaded.fused_qkv, loaded.fused_gate_up,
        loaded.gated_mlp, loaded.causal, loaded.run_order, loaded.final_norm_path)
    assert [(p.path, p.side, p.reads_stream, p.bias) for p in shrunk.projections] == [
        (p.path, p.side, p.reads_stream, p.bias) for p in loaded.projections]


@pytest.mark.parametrize("family,causal", [("bert", False), ("modernbert", False), ("llama", True), ("gpt2", True)])
def test_a_decoder_is_told_from_an_encoder_by_what_its_first_position_sees(family, causal):
    from peftkit.models.structure import structure_of

    assert structure_of(build(family)).causal is causal


def test_reading_a_structure_from_a_config_is_not_counted_by_a_caller_s_flop_counter():
    """layers_of may first run inside a model's forward under a FLOP counter (the 3ML pretraining cost): the shrunken
    model's own forwards are not the caller's computation."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    from peftkit.models.structure import structure_from_config

    config = AutoConfig.for_model("bert", **{**COMMON, "intermediate_size": 136})  # not read before: not cached
    with FlopCounterMode(display=False) as counter:
        structure = structure_from_config(config)
    assert structure.num_layers == 2 and counter.get_total_flops() == 0
