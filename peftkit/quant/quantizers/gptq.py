"""GPTQ: GPTQModel's own GPTQ solver on peftkit's calibration windows, LoRA B = 0 (the quant bench's GPTQ baseline).

Inside a block, every group of projections that share an input (q, k, v | o | gate, up | down for LLaMA; qkv | o |
gate_up | down for Phi-3) is solved in the order the block calls them, from the inputs the block produces with its
earlier projections already quantized, on the quantized chain's block inputs: the walk GPTQModel's own looper does.
Solver settings: asymmetric, ``group_size`` columns per group, no activation ordering (desc_act=False), GPTQModel's
default damping. The stored codes are what GPTQModel packs (clamp(round((Q + zero * scale) / scale), 0, 2^b - 1)),
scales cast to fp16, integer zero points; the solved Q itself feeds the next projections, as in GPTQModel.
gptqmodel is imported only here (about 6 s).
"""

from __future__ import annotations

from peftkit.quant.quantizers import Quantizer
from peftkit.utils.registry import QUANTIZERS

def gptq_codes(Q, scale, zero, bits: int, group_size: int):
    """What GPTQModel packs for a solved weight Q with per-group (out, G) scale and zero."""
    import torch

    from peftkit.quant.quantized_weight import QuantizedWeight

    s = scale.float().repeat_interleave(group_size, dim=1)
    z = zero.float().repeat_interleave(group_size, dim=1)
    codes = torch.round((Q.float() + z * s) / s).clamp_(0, 2 ** bits - 1)
    return QuantizedWeight("uniform", bits, group_size, tuple(Q.shape), codes=codes.to(torch.uint8),
                           scales=scale.to(torch.float16).float(), zeros=zero.float())


def subsets(block, linears: dict, hidden, kwargs: dict) -> list[list[str]]:
    """The projections in call order, grouped by the input tensor they share (q, k, v | o | gate, up | down)."""
    import torch

    from peftkit.quant.blocks import forward_order, run_block_batched

    order = forward_order(block, linears, hidden, kwargs)
    inputs: dict = {}

    def record(name):
        def hook(module, args):
            # the tensor itself is kept, not its id(): a freed input's id can be reused by a later one
            inputs.setdefault(name, args[0])  # returns None: the input is left as it is
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            run_block_batched(block, hidden[:1], kwargs, 1)
    finally:
        for handle in handles:
            handle.remove()
    found: list[list[str]] = []
    for name in order:
        if found and name in inputs and inputs[name] is inputs.get(found[-1][0]):
            found[-1].append(name)
        else:
            found.append([name])
    return found


@QUANTIZERS.register("gptq", help="GPTQModel's GPTQ solver on the calibration windows, LoRA B = 0")
class GPTQ(Quantizer):
    name = "gptq"
    calibrated = True
    symmetric_refusal = "runs GPTQModel's solver asymmetric, as the quant bench compares it"

    def quantize_block(self, work):
        import torch
        from gptqmodel.quantization.config import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ as Solver

        from peftkit.quant.blocks import run_block_batched

        qlinears = work.qlinears
        bits, group_size = work.options.bits, work.options.group_size

        def config():
            return QuantizeConfig(bits=bits, group_size=group_size, sym=False, desc_act=False, offload_to_disk=False)

        damp = getattr(work.options, "damp_percent", None)  # the bench's option; None = GPTQModel's default
        damp = config().damp_percent if damp is None else damp
        for q in qlinears.values():  # unsolved projections compute in full precision
            q.fp_mode = True
        stored = {}
        with torch.no_grad():
            for subset in subsets(work.qblock, qlinears, work.x_q, work.kwargs):
                linears, solvers, handles = {}, {}, []
                for name in subset:
                    q = qlinears[name]
                    linear = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None,
                                             device=q.weight.device, dtype=q.weight.dtype)
                    linear.weight.data = q.weight.detach().clone()
                    linears[name], solvers[name] = linear, Solver(linear, config())
                    solvers[name].quantizer.configure(perchannel=True)  # as GPTQModel's own processor configures it
                    handles.append(q.register_forward_hook(
                        lambda mod, args, out, s=solvers[name]: s.add_batch(args[0].detach(), out)))
                try:  # one pass over the windows feeds every projection of the subset (they share their input)
                    run_block_batched(work.qblock, work.x_q, work.kwargs, work.settings.batch_size)
                finally:
                    for handle in handles:
                        handle.remove()
                for name, solver in solvers.items():
                    q, linear = qlinears[name], linears[name]
                    scale, zero, _g_idx, *_ = solver.hf_quantize(percdamp=damp, group_size=group_size, actorder=False)
                    solved = linear.weight.detach().to(q.weight.dtype)
                    stored[name] = q.freeze(gptq_codes(solved, scale, zero, bits, group_size))
                    q.fixed_weight, q.fp_mode = solved, False  # Q feeds the next projections, as in GPTQModel
                del solvers, linears
        return stored, []
