"""bench peers: the peer tools run on the same inputs as peftkit, and the LoftQ wrapper leaves torch as it was."""

import pytest
import torch

from peftkit.bench import peers


@pytest.fixture
def tiny_peers(tiny_run_setup):
    recipe = tiny_run_setup()
    s = peers.settings(True, {"model": recipe["model"]["name"], "steps": 2, "repeats": 1, "batch_size": 4,
                              "max_length": 16, "loftq_matrices": 2, "step_repeats": 1})
    from peftkit.models.load import load_model

    return s, load_model(s["model"], "seq_cls", 2)


def test_rows_are_fixed_length_real_rows(tiny_peers):
    s, _ = tiny_peers
    rows = peers.fixed_length_rows(s, 6)
    assert len(rows) == 6
    assert {len(r["input_ids"]) for r in rows} == {16} and {len(r["attention_mask"]) for r in rows} == {16}
    assert all(sum(r["attention_mask"]) < 16 for r in rows)  # short sentences really were padded, not cut
    assert {r["labels"] for r in rows} == {0, 1}


@pytest.fixture
def filled_peers(tiny_peers):
    s, base = tiny_peers
    return {**s, "max_length": 8, "precision": "fp32"}, base  # the tiny sentences fill 8 tokens, not 16


def test_trainer_rows_are_real_rows_that_fill_max_length_without_padding(filled_peers):
    s, _ = filled_peers
    rows = peers.filled_rows(s, 40)  # more than the tiny split holds rows that fill 8 tokens: repeated
    assert len(rows) == 40
    assert {len(r["input_ids"]) for r in rows} == {8} and {sum(r["attention_mask"]) for r in rows} == {8}
    assert {r["labels"] for r in rows} == {0, 1}


def test_no_row_fills_max_length_is_a_user_error(filled_peers):
    from peftkit.errors import UserError

    s, _ = filled_peers
    with pytest.raises(UserError, match="max_length=512"):
        peers.filled_rows({**s, "max_length": 512}, 4)


def test_both_trainers_run_each_method_on_the_same_rows_in_the_same_precision(filled_peers, monkeypatch):
    s, base = filled_peers
    seen = []
    real = {"hf": peers.hf_trainer_run, "ours": peers.peftkit_run}

    def recording(side):
        def run(b, rows, o, name, precision):
            seen.append((side, name, len(rows), precision))
            return real[side](b, rows, o, name, precision)
        return run

    monkeypatch.setattr(peers, "hf_trainer_run", recording("hf"))
    monkeypatch.setattr(peers, "peftkit_run", recording("ours"))
    rows = peers.trainer_rows(base, s)
    # 1 warm-up + 1 timed round per tool and method, the same 2 steps x 4 rows, the precision peftkit resolved
    assert sorted(seen) == sorted([(side, name, 8, "fp32") for side in ("hf", "ours") for name in ("lora", "full")
                                   for _ in range(2)])
    assert [r["comparison"].split(" training")[0] for r in rows] == ["LoRA", "LoRA", "full fine-tuning",
                                                                     "full fine-tuning"]
    for row in rows:
        assert row["peftkit"] > 0 and row["peer"] > 0 and row["precision"] == "fp32"
        assert row["ratio"] == pytest.approx(row["peftkit"] / row["peer"])


def test_the_peer_trains_in_bf16_where_peftkit_resolves_bf16(filled_peers, monkeypatch):
    import transformers

    s, base = filled_peers
    given = []
    real_args = transformers.TrainingArguments

    def recording_args(*args, **kwargs):
        given.append(kwargs.get("bf16"))
        return real_args(*args, **kwargs)

    monkeypatch.setattr(transformers, "TrainingArguments", recording_args)
    s = {**s, "precision": "bf16", "steps": 1}
    rows = peers.filled_rows(s, 4)
    assert peers.resolved_precision(base, rows, s) == "bf16"
    peers.hf_trainer_run(base, rows, s, "full", "bf16")
    assert given == [True]
    with pytest.raises(RuntimeError, match="resolved precision bf16, the peer was given fp32"):
        peers.peftkit_run(base, rows, s, "full", "fp32")


COST_COLUMNS = {f"{side}_{column}" for side in ("peftkit", "peer") for column in ("seconds", "cpu_seconds", "mfu")}


def test_the_trainer_rows_have_wall_cpu_seconds_and_mfu(filled_peers, monkeypatch):
    s, base = filled_peers
    s = {**s, "methods": ["full"]}
    monkeypatch.setattr(peers, "matmul_peak_flops", lambda dtype_name: 1e9)  # a stated machine limit
    per_second, per_cpu = peers.trainer_rows(base, s)
    step_flops = peers.method_step_flops(base, peers.filled_rows(s, s["steps"] * s["batch_size"]), s, "full")
    examples = s["steps"] * s["batch_size"]
    for side in ("peftkit", "peer"):
        assert COST_COLUMNS <= set(per_second) and per_second[f"{side}_cpu_seconds"] > 0
        # examples/second and the wall seconds are one measurement; per CPU-second, the CPU seconds
        assert per_second[side] == pytest.approx(examples / per_second[f"{side}_seconds"])
        assert per_cpu[side] == pytest.approx(examples / per_cpu[f"{side}_cpu_seconds"])
        # MFU = steps x step FLOPs / wall / peak
        assert per_second[f"{side}_mfu"] == pytest.approx(s["steps"] * step_flops / per_second[f"{side}_seconds"] / 1e9)


def test_the_loop_span_starts_at_the_first_step_and_ends_at_the_last(monkeypatch):
    clock = iter([1.0, 0.5, 3.0, 1.0, 7.0, 2.5])  # (wall, cpu) at: begin of step 1, end of step 1, end of step 2
    monkeypatch.setattr(peers.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(peers.time, "process_time", lambda: next(clock))
    span = peers.LoopSpan()
    span.begin()
    span.finish()
    span.begin()  # a later step's begin does not move the start
    span.finish()
    assert (span.clocks().wall, span.clocks().cpu) == (6.0, 2.0)


def test_step_flops_are_the_counted_matmuls_of_forward_and_backward():
    from peftkit.bench.harness import count_step_flops

    class SumOfLinear:  # the loss of a method: one (m x k) @ (k x n) matmul, input without gradient
        def compute_loss(self, model, batch):
            return model(batch["x"]).sum()

    m, k, n = 8, 16, 4
    model = torch.nn.Linear(k, n, bias=False)
    # forward 2mkn; backward only the weight gradient (the input needs none): 2mkn more
    assert count_step_flops(SumOfLinear(), model, {"x": torch.randn(m, k)}) == 4 * m * k * n
    assert model.weight.grad is None  # cleared afterwards


def test_clocks_read_wall_and_process_cpu_time(monkeypatch):
    from peftkit.bench import harness

    monkeypatch.setattr(harness.time, "perf_counter", iter([10.0, 12.5]).__next__)
    monkeypatch.setattr(harness.time, "process_time", iter([3.0, 3.75]).__next__)
    with harness.Clocks() as spent:
        pass
    assert (spent.wall, spent.cpu) == (2.5, 0.75)
    assert harness.mfu(4e9, 2.0, 1e9) == 2.0 and harness.mfu(None, 2.0, 1e9) is None


def test_peft_loftq_runs_here_and_matches_ours_at_4_bits():
    pytest.importorskip("bitsandbytes")  # peft's LoftQ quantizes with it (in requirements.txt; absent on some GPU images)
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * 0.05
    to_before = torch.Tensor.to
    q_peer, A_peer, B_peer = peers.peft_loftq(weight, 4, 4, 1)
    assert torch.Tensor.to is to_before  # the device rewrite is undone
    assert q_peer.device == weight.device and B_peer.shape == (64, 4) and A_peer.shape == (4, 128)
    peer = peers.relative_error(weight, q_peer, A_peer, B_peer)
    ours = peers.relative_error(weight, *peers.peftkit_loftq(weight, 4, 4, 1))
    quant_only = float((weight - q_peer).norm() / weight.norm())
    assert peer < quant_only  # the low-rank part really corrects the quantization residual
    assert ours == pytest.approx(peer, rel=1e-3)  # both are NF4 with blocks of 64 + the same rank-r SVD step


def test_device_rewrite_only_touches_accelerator_targets():
    x = torch.ones(2)
    with peers.compute_device_rewritten(torch.device("cpu")):
        assert x.to("cuda").device.type == "cpu"
        assert x.to(device="xpu:0").device.type == "cpu"
        assert x.to(torch.float64).dtype == torch.float64
    assert torch.Tensor.to is not None and x.to(torch.float16).dtype == torch.float16


def test_sparse_peer_rows_compare_the_same_budget(tiny_peers):
    s, base = tiny_peers
    if not peers.supertuning_in_peft():
        pytest.skip("this peft has no Super-Tuning tuner")
    step, params, entries = peers.sparse_rows(base, s)
    assert step["peftkit"] > 0 and step["peer"] > 0 and step["ratio"] == pytest.approx(step["peftkit"] / step["peer"])
    assert step["peftkit_seconds"] == step["peftkit"] and step["peer_seconds"] == step["peer"]
    assert step["peftkit_cpu_seconds"] > 0 and step["peer_cpu_seconds"] > 0
    assert step["peftkit_mfu"] > 0 and step["peer_mfu"] > 0
    assert all(params[c] is None and entries[c] is None for c in COST_COLUMNS)  # counts, nothing timed
    assert params["peftkit"] >= entries["peftkit"] and params["peer"] >= entries["peer"]
    # same rho: PaFi ranks across the pool, peft per matrix; the sparse entries agree up to rounding per matrix
    assert entries["ratio"] == pytest.approx(1.0, abs=0.05)
    assert 0 < entries["peer"] < 0.01 * sum(p.numel() for p in base.parameters())


def test_the_loftq_row_times_both_sides_and_has_no_mfu(monkeypatch):
    def loftq(weight, bits, rank, iters):  # a stand-in that works for its CPU time
        for _ in range(20):
            weight @ weight.T
        return torch.zeros_like(weight), torch.zeros(rank, weight.shape[1]), torch.zeros(weight.shape[0], rank)

    monkeypatch.setattr(peers, "peftkit_loftq", loftq)
    monkeypatch.setattr(peers, "peft_loftq", loftq)
    base = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 128))
    [row] = peers.loftq_rows(base, {"loftq_matrices": 2, "loftq_rank": 4, "loftq_iters": 1, "model": "two linears"})
    assert row["peftkit"] == pytest.approx(1.0) and row["ratio"] == pytest.approx(1.0)
    for side in ("peftkit", "peer"):
        assert row[f"{side}_seconds"] > 0 and row[f"{side}_cpu_seconds"] > 0 and row[f"{side}_mfu"] is None
