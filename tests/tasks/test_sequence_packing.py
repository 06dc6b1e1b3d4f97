"""`data.packing: true`: documents packed into one row see only themselves (logits equal to each document run alone,
fp32, tiny decoders of several families), the loss is on the same tokens as without packing, rows are never split,
and the option is refused where there is nothing to pack or the model would let documents see each other."""

import json

import pytest
from helpers.own_data import DECODER_CONFIGS, decoder_tokenizer, qa_rows, save_tiny_decoder, write_rows
from helpers.reliability import invoke, write_recipe

from peftkit.config.loader import load_recipe
from peftkit.errors import UserError
from peftkit.tasks.packing import (
    PackedCollator,
    check_documents_stay_apart,
    collate_packed_windows,
    join_documents,
    pack_rows,
    window_positions,
)


def decoder(family: str, attn: str = "sdpa", vocab: int = 48, seed: int = 0):
    """A 2-layer random causal LM of ``family`` in fp32 with the given attention kernel, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family != "gpt2":
        common.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    config = AutoConfig.for_model(family, **common, **DECODER_CONFIGS[family])
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().eval()


def random_docs(lengths, vocab: int = 48, seed: int = 1) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_each_document_in_a_packed_row_has_the_logits_it_has_alone(family, attn):
    import torch

    model = decoder(family, attn)
    docs = random_docs((5, 9, 3, 7))
    # two packed rows of different widths: the second is padded, and its padding is a block of its own
    rows = [join_documents([{"input_ids": d, "labels": d} for d in docs[:3]]),
            join_documents([{"input_ids": d, "labels": d} for d in docs[3:]])]
    batch = PackedCollator(0)(rows)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    with torch.no_grad():
        packed = model(**batch).logits
        placed = [(0, 0, docs[0]), (0, 5, docs[1]), (0, 14, docs[2]), (1, 0, docs[3])]
        for row, start, doc in placed:
            alone = model(input_ids=torch.tensor([doc])).logits[0]
            torch.testing.assert_close(packed[row, start:start + len(doc)], alone, atol=1e-5, rtol=0)


def sft_rows(tokenizer_dir):
    """SFT rows as the task encodes them (loss on the answers only), and rows whose every token is a label, so a
    prediction across a document boundary would count."""
    from peftkit.tasks.dataset import encode_sft

    tok = decoder_tokenizer(tokenizer_dir)
    qa = qa_rows(12, seed=2)
    rows, _, _ = encode_sft(tok, [r["question"] for r in qa], [r["answer"] for r in qa], 32)
    plain = [{"input_ids": d, "labels": list(d)} for d in random_docs((4, 6, 2, 9), vocab=len(tok))]
    return rows + plain, len(tok)


def summed_loss(model, batch):
    """(summed next-token cross-entropy over the labels that are not -100, their count), from the model's own mean
    loss and by hand."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        out = model(**batch)
    labels = batch["labels"]
    count = int((labels[:, 1:] != -100).sum())
    by_hand = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                              reduction="sum").item()
    return by_hand, out.loss.item() * count, count


def test_the_packed_loss_is_the_unpacked_loss_on_the_same_tokens(tmp_path):
    from peftkit.tasks.dataset import SFTCollator

    rows, vocab = sft_rows(tmp_path / "tok")
    model = decoder("llama", vocab=vocab)
    packed = pack_rows(rows, 32)
    assert len(packed) < len(rows)
    packed_sum, packed_model_sum, packed_count = summed_loss(model, PackedCollator(0)(packed))
    unpacked = [summed_loss(model, SFTCollator(0)([r])) for r in rows]
    assert packed_count == sum(c for _, _, c in unpacked)
    expected = sum(s for s, _, _ in unpacked)
    # fp32 sums of a few hundred terms of size ~4: 1e-5 relative is far above rounding, far below one token's loss
    assert packed_sum == pytest.approx(expected, rel=1e-5)
    assert packed_model_sum == pytest.approx(expected, rel=1e-5)


def test_rows_are_packed_whole_by_best_fit_decreasing():
    rows = [{"input_ids": [n] * n, "labels": [n] * n} for n in (2, 6, 4, 5, 3)]
    packed = pack_rows(rows, 8)
    # longest first, each into the open row with the least room that holds it (greedy in order would need 4 rows)
    assert [r["input_ids"] for r in packed] == [[6] * 6 + [2] * 2, [5] * 5 + [3] * 3, [4] * 4]
    assert [r["position_ids"] for r in packed] == [[*range(6), 0, 1], [*range(5), 0, 1, 2], [*range(4)]]
    assert [r["labels"] for r in packed][0] == [-100] + [6] * 5 + [-100, 2]


def test_many_rows_are_each_packed_exactly_once_within_max_length():
    import random

    rng = random.Random(0)
    rows = [{"input_ids": [i] * rng.randint(1, 40), "labels": [i] * 3} for i in range(300)]
    packed = pack_rows(rows, 40)
    seen = []
    for r in packed:
        assert len(r["input_ids"]) <= 40
        starts = [k for k, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        seen += [r["input_ids"][a:b] for a, b in zip(starts, starts[1:])]
    assert sorted(seen) == sorted(r["input_ids"] for r in rows)


def test_causal_lm_windows_restart_positions_and_mask_labels_where_a_row_starts():
    import torch

    assert window_positions([3, 5, 4], 6, 2) == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]]
    ids = torch.arange(12).reshape(2, 6)
    batch = collate_packed_windows([{"input_ids": ids[i], "position_ids": p}
                                    for i, p in enumerate(window_positions([3, 5, 4], 6, 2))])
    assert batch["labels"].tolist() == [[-100, 1, 2, -100, 4, 5], [-100, 7, -100, 9, 10, 11]]
    assert batch["use_cache"] is False and "attention_mask" not in batch


def test_a_model_that_ignores_position_ids_is_refused():
    check_documents_stay_apart(decoder("llama"), "tiny-llama")
    with pytest.raises(UserError, match="data.packing: tiny-opt"):
        check_documents_stay_apart(decoder("opt"), "tiny-opt")


@pytest.mark.parametrize("data,head,needle", [
    ({"task": "sst2", "packing": True}, "seq_cls", "packing: packs rows of data.task_type causal-lm or sft"),
    ({"task": "wikitext2", "packing": True}, "causal_lm", "data.task 'wikitext2' has no rows to pack"),
    ({"train_file": "{f}", "task_type": "classification", "packing": True}, "seq_cls", "packing: only for"),
    ({"train_file": "{f}", "packing": True}, "seq_cls", "data.packing: only for data.task_type causal-lm or sft"),
])
def test_packing_where_there_is_nothing_to_pack_is_refused(tmp_path, data, head, needle):
    write_rows(tmp_path / "rows.jsonl", qa_rows(4))
    data = {k: (str(tmp_path / "rows.jsonl") if v == "{f}" else v) for k, v in data.items()}
    r = {"model": {"name": "minilm-l6", "task_head": head}, "data": data, "method": {"name": "lora"}}
    with pytest.raises(UserError) as e:
        load_recipe(r, kind="finetune")
    assert needle in str(e.value), str(e.value)


def test_packing_a_classification_recipe_exits_2_with_the_reason(tmp_path):
    out = tmp_path / "out"
    # a model that is not there: were packing let through, the run would still stop before training, for another reason
    path = write_recipe(tmp_path / "recipe.yaml", {"model": {"name": str(tmp_path / "no-model")},
                                                   "method": {"name": "lora"}, "data": {"task": "sst2", "packing": True},
                                                   "output": {"dir": str(out)}})
    result = invoke("finetune", path)
    assert result.exit_code == 2, result.output
    assert "packs rows of data.task_type causal-lm or sft" in result.output and "Traceback" not in result.output
    assert not out.exists()


def own_recipe(model, data, out, **train):
    t = {"max_steps": 8, "batch_size": 4, "lr": 3e-3, "seed": 3, "log_every": 1, "threads": 1, "warmup_ratio": 0.0}
    t.update(train)
    return {"model": {"name": str(model), "task_head": "causal_lm"}, "data": {"max_length": 32, **data},
            "method": {"name": "full"}, "train": t, "output": {"dir": str(out)}}


def run(r):
    from peftkit.train.pipeline import run_training

    run_dir = run_training(load_recipe(r, kind="finetune"))
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_a_packed_sft_run_trains_on_fewer_rows_and_is_scored_like_an_unpacked_one(tmp_path):
    model = save_tiny_decoder(tmp_path / "llama")
    write_rows(tmp_path / "qa.jsonl", qa_rows(48))
    write_rows(tmp_path / "qa-val.jsonl", qa_rows(16, seed=5))
    data = {"train_file": str(tmp_path / "qa.jsonl"), "validation_file": str(tmp_path / "qa-val.jsonl"),
            "prompt_column": "question", "response_column": "answer"}
    plain = run(own_recipe(model, data, tmp_path / "plain"))
    packed = run(own_recipe(model, {**data, "packing": True}, tmp_path / "packed"))
    assert packed["packing"] is True and packed["packed_rows"] < packed["n_train"] == plain["n_train"] == 48
    # evaluation is not packed: before any step both runs score the same model on the same rows
    assert packed["loss_start"] == pytest.approx(plain["loss_start"], rel=1e-6)
    assert packed["tokens"] == plain["tokens"]
    assert packed["loss"] < packed["loss_start"]


@pytest.mark.slow
def test_a_packed_causal_lm_run_and_a_packing_refusal_for_opt(tmp_path):
    from helpers.own_data import sentiment_rows

    rows = [{"text": r["review"]} for r in sentiment_rows(120)]
    write_rows(tmp_path / "text.jsonl", rows)
    data = {"train_file": str(tmp_path / "text.jsonl"), "task_type": "causal-lm", "packing": True, "max_length": 16}
    m = run(own_recipe(save_tiny_decoder(tmp_path / "llama"), data, tmp_path / "lm"))
    assert m["packing"] is True and m["ppl"] < m["ppl_start"]
    with pytest.raises(UserError, match="data.packing"):
        run(own_recipe(save_tiny_decoder(tmp_path / "opt", family="opt"), data, tmp_path / "opt-run"))
    assert not (tmp_path / "opt-run").exists()
