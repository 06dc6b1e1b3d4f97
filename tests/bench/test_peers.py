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


def test_both_trainers_run_the_same_number_of_steps_and_report_a_ratio(tiny_peers, monkeypatch):
    s, base = tiny_peers
    steps_seen = {}
    real_hf, real_ours = peers.hf_trainer_run, peers.peftkit_run
    monkeypatch.setattr(peers, "hf_trainer_run", lambda b, r, o: steps_seen.setdefault("hf", len(r)) and real_hf(b, r, o))
    monkeypatch.setattr(peers, "peftkit_run", lambda b, r, o: steps_seen.setdefault("ours", len(r)) and real_ours(b, r, o))
    [row] = peers.trainer_rows(base, s)
    assert steps_seen == {"hf": 8, "ours": 8}  # the same 2 steps x 4 rows for both tools
    assert row["peftkit"] > 0 and row["peer"] > 0
    assert row["ratio"] == pytest.approx(row["peftkit"] / row["peer"])
    assert "examples/second" in row["unit"]


COST_COLUMNS = {f"{side}_{column}" for side in ("peftkit", "peer") for column in ("seconds", "cpu_seconds", "mfu")}


def test_the_trainer_row_has_wall_cpu_seconds_and_mfu(tiny_peers, monkeypatch):
    s, base = tiny_peers
    monkeypatch.setattr(peers, "matmul_peak_flops", lambda dtype_name: 1e9)  # a stated machine limit
    [row] = peers.trainer_rows(base, s)
    assert COST_COLUMNS <= set(row)
    step_flops = peers.lora_step_flops(base, peers.fixed_length_rows(s, s["steps"] * s["batch_size"]), s)
    for side in ("peftkit", "peer"):
        assert row[f"{side}_cpu_seconds"] > 0
        # examples/second and the wall seconds are one measurement; MFU = steps x step FLOPs / wall / peak
        assert row[side] == pytest.approx(s["steps"] * s["batch_size"] / row[f"{side}_seconds"])
        assert row[f"{side}_mfu"] == pytest.approx(s["steps"] * step_flops / row[f"{side}_seconds"] / 1e9)


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
