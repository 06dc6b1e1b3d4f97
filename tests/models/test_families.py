"""Model families: a tiny random model of each of 16 families, built from its config here; every cell of the support
table is exercised. A "yes" cell trains 2 steps on one's own rows, saves, reloads (peftkit's loader against plain
transformers or peft, where docs/interop.md says they load it: equal logits) and predicts (classification) or
generates (causal LM); a "-" cell is refused with the table's reason before any data is read. The table itself is
computed from the methods' declarations (``heads``, ``needs``) against each family's derived structure."""

import pytest
from helpers.own_data import decoder_tokenizer, sentiment_rows, write_rows
from helpers.tiny import tiny_bert_tokenizer

from peftkit.config.loader import load_recipe
from peftkit.errors import UserError
from peftkit.models.families import FAMILIES

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64)
DECODER = dict(COMMON, num_key_value_heads=2)
# label -> (model_type, config values): 17 families, Llama-3 (rope scaling) beside LLaMA
TINY = {
    "bert": ("bert", COMMON),
    "roberta": ("roberta", dict(COMMON, max_position_embeddings=70)),
    "xlm-roberta": ("xlm-roberta", dict(COMMON, max_position_embeddings=70)),
    "electra": ("electra", dict(COMMON, embedding_size=32)),
    "deberta-v2": ("deberta-v2", COMMON),
    "distilbert": ("distilbert", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)),
    "modernbert": ("modernbert", dict(COMMON, global_attn_every_n_layers=1, local_attention=16)),
    "llama": ("llama", DECODER),
    "llama3": ("llama", dict(DECODER, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": ("mistral", DECODER),
    "qwen2": ("qwen2", DECODER),
    "qwen3": ("qwen3", dict(DECODER, head_dim=8)),
    "gemma": ("gemma", dict(DECODER, head_dim=8)),
    "gemma2": ("gemma2", dict(DECODER, head_dim=8)),
    "phi3": ("phi3", DECODER),
    "opt": ("opt", dict(COMMON, ffn_dim=64, word_embed_proj_dim=32)),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}
# model types outside FAMILIES: read from their structure, never listed anywhere in peftkit
UNLISTED = {"starcoder2": ("starcoder2", DECODER), "camembert": ("camembert", dict(COMMON, max_position_embeddings=70))}
TRAIN = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "threads": 1, "eval_batch_size": 8}
# methods whose base is not a transformers checkpoint: apiq fine-tunes a `peftkit quantize` output (tests/quant/)
OWN_BASE = {"apiq"}


def tiny_config(label: str, tok):
    from transformers import AutoConfig

    model_type, values = TINY[label]
    if kind_of(model_type) == "encoder":
        special = {"pad_token_id": 1 if "roberta" in model_type else 0}
        if model_type == "modernbert":
            special.update(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, cls_token_id=tok.cls_token_id,
                           sep_token_id=tok.sep_token_id)
    else:
        special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    return AutoConfig.for_model(model_type, vocab_size=len(tok), num_labels=2, **special, **values)


def kind_of(model_type: str) -> str:
    from transformers import AutoConfig

    from peftkit.models.families import family_of_config

    return (FAMILIES[model_type] if model_type in FAMILIES else family_of_config(AutoConfig.for_model(model_type))).kind


def save_family(directory, label: str, head: str = "seq_cls", seed: int = 0):
    """A random 2-layer model of family ``label`` with a tokenizer, as a checkpoint directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_type = TINY[label][0]
    if kind_of(model_type) == "encoder":
        tok = tiny_bert_tokenizer(directory)
        if model_type != "bert":  # these take no token type ids
            tok.model_input_names = ["input_ids", "attention_mask"]
    else:
        tok = decoder_tokenizer(directory, chat=False)
        tok.model_input_names = ["input_ids", "attention_mask"]
    tok.save_pretrained(directory)
    tiny_config(label, tok).save_pretrained(directory)  # AutoTokenizer reads the model type from it
    if not AutoTokenizer.from_pretrained(directory)("good").input_ids:
        # transformers rebuilds Qwen2's tokenizer as byte-level BPE (no merges) around the saved vocabulary, which
        # then reads single bytes only: give it the letters and the byte-level space
        tok = decoder_tokenizer(directory, chat=False, extra_words=(*"abcdefghijklmnopqrstuvwxyz", "\u0120"))
        tok.model_input_names = ["input_ids", "attention_mask"]
        tok.save_pretrained(directory)
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM
    auto.from_config(tiny_config(label, tok)).save_pretrained(directory)
    return directory


def table():
    """method -> family -> None (supported) or the reason, as docs/methods/support.md shows it."""
    from peftkit.utils.registry import METHODS

    return {e.name: {f: e.target.unsupported(FAMILIES[f]) for f in FAMILIES} for e in METHODS.entries()}


def cells(head: str, supported: bool):
    """(family label, method) pairs; a method's option variants (``option_needs``) as "method:option=value"."""
    from peftkit.utils.registry import METHODS

    found = []
    for label, (model_type, _) in TINY.items():
        family = FAMILIES[model_type]
        if head == "causal_lm" and family.kind != "decoder":
            continue
        for entry in METHODS.entries():
            method = entry.target
            if entry.name in OWN_BASE or head not in method.heads:
                continue
            if (method.unsupported(family) is None) == supported:
                found.append((label, entry.name))
            for (option, value), extra in method.option_needs.items():
                if (method.unsupported(family, (*method.needs, *extra)) is None) == supported and supported:
                    found.append((label, f"{entry.name}:{option}={value}"))
    return found


def claims():
    return cells("seq_cls", True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """label, head -> a saved tiny checkpoint, built once per module."""
    made = {}

    def get(label: str, head: str = "seq_cls"):
        if (label, head) not in made:
            made[label, head] = save_family(tmp_path_factory.mktemp(f"{label}-{head}"), label, head)
        return made[label, head]

    return get


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rows")
    return write_rows(tmp / "train.csv", sentiment_rows(24))


@pytest.fixture(scope="module")
def text_rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    return write_rows(tmp / "text.csv", [{"text": f"{r['review']} is {r['sentiment']}"} for r in sentiment_rows(64)])


def recipe(model, rows, method: str, out, **data) -> dict:
    """A recipe; ``method`` may carry one option as "name:option=value"."""
    name, _, option = method.partition(":")
    options = dict([option.split("=")]) if option else {}
    return {"model": {"name": str(model)}, "data": {"train_file": str(rows), "max_length": 16, **data},
            "method": {"name": name, **options}, "output": {"dir": str(out)}, "train": dict(TRAIN)}


def logits_of(model, tok, texts):
    import torch

    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits


def assert_plain_libraries_load_it(run, base, method_name: str, head: str, texts):
    """Where docs/interop.md says transformers (merged) or peft (adapter) loads a method's result: the same logits as
    peftkit's own loader. MEFT has no such form: peftkit's loader is the only one."""
    import peftkit
    from peftkit.utils.registry import METHODS

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM
    method = METHODS.get(method_name.partition(":")[0])
    ours, tok = peftkit.load(run, merge=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    reference = logits_of(ours, tok, texts)
    assert reference.isfinite().all()
    loaded = []
    if method.can_merge:
        merged, _ = peftkit.load(run)
        merged.save_pretrained(run / "merged-check")
        loaded.append(auto.from_pretrained(run / "merged-check"))
    if method.unmerged_export == "peft":
        from peft import PeftModel

        loaded.append(PeftModel.from_pretrained(auto.from_pretrained(base), run / "final"))
    for model in loaded:
        assert (logits_of(model, tok, texts) - reference).abs().max() <= 1e-4
    assert loaded or not method.can_merge


def test_the_tested_families_are_the_table_columns():
    assert list(FAMILIES) == list(dict.fromkeys(model_type for model_type, _ in TINY.values()))
    assert {f for f in FAMILIES if FAMILIES[f].kind == "decoder"} == {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt", "gpt2"}


def test_every_method_runs_on_every_family_where_the_brief_promises_it():
    t = table()
    for method in ("full", "head-only", "lora", "pafi"):
        assert all(why is None for why in t[method].values()), (method, t[method])


@pytest.mark.parametrize("label", sorted(TINY))
def test_a_tiny_model_gets_the_same_answers_as_the_table(checkpoint, label):
    """The table is computed on transformers' default config of each model type; the tiny model built here is read
    from its own config the same way, and each method supports it exactly where the table says."""
    from transformers import AutoConfig

    from peftkit.models.families import family_of_config
    from peftkit.utils.registry import METHODS

    family = family_of_config(AutoConfig.from_pretrained(checkpoint(label)))
    expected = FAMILIES[TINY[label][0]]
    for entry in METHODS.entries():
        assert entry.target.unsupported(family) == entry.target.unsupported(expected), entry.name
    assert (family.layers, family.attn_linears, family.ffn_linears, family.kind) == (
        expected.layers, expected.attn_linears, expected.ffn_linears, expected.kind)


@pytest.mark.slow
@pytest.mark.parametrize("label,method", claims())
def test_each_supported_cell_trains_saves_reloads_and_predicts(tmp_path, checkpoint, rows, label, method):
    from peftkit.commands.predict import predict
    from peftkit.train.pipeline import run_training

    model = checkpoint(label)
    run = run_training(load_recipe(recipe(model, rows, method, tmp_path / "run", label_column="sentiment"),
                                   kind="finetune"))
    records = predict(str(run), str(rows))
    assert len(records) == 24 and {r["label"] for r in records} <= {"negative", "positive"}
    assert_plain_libraries_load_it(run, model, method, "seq_cls", ["good film", "bad plot or good"])


@pytest.mark.parametrize("label", sorted(UNLISTED))
def test_a_family_outside_the_tested_ones_is_read_from_its_structure_and_fine_tunes(tmp_path, monkeypatch, rows, label):
    from peftkit.commands.predict import predict
    from peftkit.models.families import family_of_config
    from peftkit.models.load import check_model_dir
    from peftkit.train.pipeline import run_training

    assert label not in FAMILIES
    monkeypatch.setitem(TINY, label, UNLISTED[label])
    model = save_family(tmp_path / "model", label)
    assert check_model_dir(model)["model_type"] == label
    family = family_of_config(check_model_dir(model))
    assert family.lacks("linear_projections") is None
    run = run_training(load_recipe(recipe(model, rows, "lora", tmp_path / "run", label_column="sentiment"),
                                   kind="finetune"))
    assert len(predict(str(run), str(rows))) == 24


@pytest.mark.slow
@pytest.mark.parametrize("label,method", cells("causal_lm", True))
def test_each_supported_causal_lm_cell_trains_saves_reloads_and_generates(tmp_path, checkpoint, text_rows, label,
                                                                           method):
    from peftkit.commands.predict import generate
    from peftkit.train.pipeline import run_training

    model = checkpoint(label, "causal_lm")
    r = recipe(model, text_rows, method, tmp_path / "run", task_type="causal-lm", max_length=8)
    r["model"]["task_head"] = "causal_lm"
    run = run_training(load_recipe(r, kind="finetune"))
    out = generate(str(run), prompts=["good"], max_new_tokens=3)
    assert len(out) == 1 and isinstance(out[0]["generation"], str)
    assert_plain_libraries_load_it(run, model, method, "causal_lm", ["good film is", "bad plot"])


REFUSED = cells("seq_cls", False) + [c for c in cells("causal_lm", False) if c not in cells("seq_cls", False)]


@pytest.mark.parametrize("label,method", REFUSED)
def test_each_unsupported_cell_is_refused_with_its_reason_before_data_is_read(tmp_path, monkeypatch, checkpoint,
                                                                              rows, label, method):
    import peftkit.tasks.dataset
    from peftkit.train.pipeline import run_training

    def no_reading(*args, **kwargs):
        raise AssertionError("the data was read before the model's family was checked")

    monkeypatch.setattr(peftkit.tasks.dataset, "read_file", no_reading)
    model_type = TINY[label][0]
    why = table()[method][model_type]
    with pytest.raises(UserError) as e:
        run_training(load_recipe(recipe(checkpoint(label), rows, method, tmp_path / "run", label_column="sentiment"),
                                 kind="finetune"))
    assert f"method {method} does not support {model_type} models: {why}." in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("label", ["qwen2", "llama"])
def test_an_option_that_needs_more_is_refused_where_the_family_lacks_it(tmp_path, monkeypatch, checkpoint, rows,
                                                                       label):
    """HiWi's bias target adapts the FFN biases (``option_needs``): Qwen2 has biases, on q/k/v only, so bitfit runs on
    it but hiwi target=bias does not; LLaMA has none."""
    import peftkit.tasks.dataset
    from peftkit.train.pipeline import run_training

    def no_reading(*args, **kwargs):
        raise AssertionError("the data was read before the model's family was checked")

    monkeypatch.setattr(peftkit.tasks.dataset, "read_file", no_reading)
    r = recipe(checkpoint(label), rows, "hiwi", tmp_path / "run", label_column="sentiment")
    r["method"]["target"] = "bias"
    with pytest.raises(UserError) as e:
        run_training(load_recipe(r, kind="finetune"))
    assert f"method hiwi does not support {label} models: its FFN projections have no bias terms." in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_refused_cell_exits_2_from_the_cli_with_one_paragraph(tmp_path, checkpoint, rows):
    from helpers.reliability import run_cli, write_recipe

    path = write_recipe(tmp_path / "r.yaml", recipe(checkpoint("llama"), rows, "bitfit", tmp_path / "run",
                                                    label_column="sentiment"))
    done = run_cli("finetune", path)
    assert done.returncode == 2, done.stderr
    assert "method bitfit does not support llama models: its layers have no bias terms" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("label", ["distilbert", "qwen2", "phi3", "gpt2"])
def test_lora_default_targets_are_every_projection_and_all_linear_is_peft_s(checkpoint, label):
    """Default: every attention and FFN projection the structure finds (today's BERT/LLaMA choice, on any family);
    all-linear: peft's keyword, which never adapts the task head."""
    from transformers import AutoModelForSequenceClassification

    from peftkit.methods import create_method
    from peftkit.models.families import family_of, layers_of

    def adapted(targets):
        base = AutoModelForSequenceClassification.from_pretrained(checkpoint(label))
        model = create_method("lora", targets=targets).prepare(base)
        return {n.rsplit(".", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A")}

    base = AutoModelForSequenceClassification.from_pretrained(checkpoint(label))
    family, names = family_of(base), {id(m): n for n, m in base.named_modules()}
    projections = {names[id(layer.get_submodule(p))] for layer in layers_of(base) for p in family.projections}
    assert {n.removeprefix("base_model.model.") for n in adapted(None)} == projections
    everything = {n.removeprefix("base_model.model.") for n in adapted("all-linear")}
    assert projections <= everything and not any(n.startswith(("score", "classifier")) for n in everything)


def test_explicit_lora_targets_are_honoured_on_any_family(checkpoint):
    from transformers import AutoModelForSequenceClassification

    from peftkit.methods import create_method

    base = AutoModelForSequenceClassification.from_pretrained(checkpoint("mistral"))
    method = create_method("lora", targets=["q_proj", "v_proj"])
    method.check_family(base)
    model = method.prepare(base)
    assert {n.rsplit(".", 2)[-2] for n, _ in model.named_modules() if n.endswith(".lora_A")} == {"q_proj", "v_proj"}


def test_the_support_page_is_generated_from_the_code():
    from peftkit.commands.support import DOC, support_markdown

    assert DOC.read_text() == support_markdown(), "docs/methods/support.md is stale: python -m peftkit.commands.support"


def test_a_hub_id_in_the_local_cache_loads_without_the_network(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from transformers import AutoModelForSequenceClassification

    from peftkit.models.load import load_model, load_tokenizer

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-bert"
    save_family(repo / "snapshots" / commit, "bert")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("someone/tiny-bert", num_labels=2)
    reference = AutoModelForSequenceClassification.from_pretrained(repo / "snapshots" / commit)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert load_tokenizer("someone/tiny-bert").vocab_size == reference.config.vocab_size
    with pytest.raises(UserError, match="nor in the local Hugging Face cache"):
        load_model("someone/not-cached")
