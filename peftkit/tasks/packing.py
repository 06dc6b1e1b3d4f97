"""Sequence packing (``data.packing: true``): several documents in one training row, none attending to another.

SFT rows are placed whole into packed rows of at most ``data.max_length`` tokens by best-fit decreasing (longest
row first, into the open packed row with the least room that still holds it; a new one when none does), so no
row is ever split. Causal-LM text keeps its windows (the rows joined with EOS, cut every ``data.max_length``
tokens) and marks where each row starts inside a window.

Attention stays inside a document through transformers' packed-sequence path: the batch carries ``position_ids``
that restart at 0 where each document starts and no ``attention_mask``, and ``use_cache: False`` (with a cache
object present, transformers does not look for packed sequences and the documents would see each other). The
label of each document's first token is -100, so the last token of one document never predicts the first token
of the next; the loss is then on the same tokens as when each row is its own sequence. Padding at the end of a
packed row is one more block of its own with labels -100.
"""

from __future__ import annotations


def pack_rows(rows: list[dict], max_length: int) -> list[dict]:
    """SFT rows ({"input_ids", "labels"} lists, each at most ``max_length`` long) packed whole by best-fit
    decreasing into rows {"input_ids", "labels", "position_ids"}; the order is fixed by the lengths and the rows'
    order (ties keep it)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    # open packed rows by the room they have left: the best fit is the first non-empty list from the length up
    by_room: list[list[int]] = [[] for _ in range(max_length + 1)]
    for i in order:
        size = len(rows[i]["input_ids"])
        if size > max_length:
            raise ValueError(f"a row of {size} tokens does not fit a packed row of {max_length}")
        room = next((r for r in range(size, max_length + 1) if by_room[r]), None)
        if room is None:
            bins.append([])
            chosen, room = len(bins) - 1, max_length
        else:
            chosen = by_room[room].pop()
        bins[chosen].append(i)
        by_room[room - size].append(chosen)
    return [join_documents([rows[i] for i in members]) for members in bins]


def join_documents(documents: list[dict]) -> dict:
    """One packed row from documents with input ids and labels: position ids restart per document and the first
    label of each document is -100 (it has nothing of its own document to be predicted from)."""
    ids, labels, positions = [], [], []
    for doc in documents:
        n = len(doc["input_ids"])
        ids += list(doc["input_ids"])
        labels += [-100] + list(doc["labels"][1:])
        positions += list(range(n))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def window_positions(doc_lengths: list[int], seq_len: int, n_windows: int) -> list[list[int]]:
    """Position ids of each of the first ``n_windows`` windows of a token stream made of documents of these
    lengths laid end to end: 0 where a document starts and at each window's first token (a document cut by the
    window start has no earlier context inside the window), counting up in between."""
    starts, offset = set(), 0
    for n in doc_lengths:
        starts.add(offset)
        offset += n
    out = []
    for w in range(n_windows):
        positions, current = [], 0
        for t in range(w * seq_len, (w + 1) * seq_len):
            current = 0 if t in starts or t == w * seq_len else current + 1
            positions.append(current)
        out.append(positions)
    return out


class PackedCollator:
    """Packed rows of one batch: padded to the widest with the pad token as a block of its own (position ids
    from 0, labels -100), no attention mask, position ids, and no cache."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids, labels, positions = [], [], []
        for r in rows:
            pad = width - len(r["input_ids"])
            ids.append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(r["labels"]) + [-100] * pad)
            positions.append(list(r["position_ids"]) + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(positions), "use_cache": False}


def collate_packed_windows(rows: list[dict]) -> dict:
    """Causal-LM windows with the rows marked inside them: labels are the inputs except -100 where a row starts
    (position 0), so no row's first token is predicted from the row before it."""
    import torch

    ids = torch.stack([r["input_ids"] for r in rows])
    positions = torch.tensor([r["position_ids"] for r in rows])
    labels = ids.masked_fill(positions == 0, -100)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}


def check_documents_stay_apart(model, name: str) -> None:
    """Refuse a model whose forward lets packed documents see each other: a model that builds its own positions
    or mask and ignores ``position_ids`` (OPT does) would train every document on its neighbours. Two packed rows
    that differ only in their first document must give the second document the same logits."""
    import torch

    from peftkit.errors import UserError

    vocab = model.get_input_embeddings().num_embeddings
    first = [[(7 * i + 3) % vocab for i in range(5)], [(11 * i + 5) % vocab for i in range(5)]]
    second = [(13 * i + 2) % vocab for i in range(4)]
    collate = PackedCollator(0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batch = collate([join_documents([{"input_ids": f, "labels": f}, {"input_ids": second, "labels": second}])
                             for f in first])
            logits = model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}).logits.float()
    finally:
        model.train(was_training)
    tail = logits[:, len(first[0]):]
    if not torch.allclose(tail[0], tail[1], rtol=1e-4, atol=1e-4 * float(tail.abs().max())):
        raise UserError(f"data.packing: {name} ({model.config.model_type}) lets the documents of a packed row attend "
                        f"to each other (its forward does not restart attention at the position ids where a document "
                        f"starts), so packing would change what it learns. Remove data.packing for this model, or use "
                        f"a LLaMA-, Mistral-, Qwen2- or GPT-2-style model.")
