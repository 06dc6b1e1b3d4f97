"""The compact delta format of an unmerged PaFi / HiWi / BitFit export, and its loader.

This file is self-contained (it imports only json, pathlib, torch and safetensors) and ``peftkit export`` copies
it verbatim into every delta export as ``apply_delta.py``, so a delta can be applied to its base model without
peftkit installed::

    from transformers import AutoModelForSequenceClassification
    from apply_delta import apply_delta                      # the file shipped in the export
    model = apply_delta(AutoModelForSequenceClassification.from_pretrained("EXPORT/base"), "EXPORT")

An export holds two files:

* ``delta.json``: ``{"format": "peftkit-delta", "version": 1, "tensors": {NAME: OP, ...}}`` where NAME is a
  parameter name of the base model (``model.get_parameter(NAME)``) and OP one of:

  - ``"replace"``: the tensor ``NAME`` in delta.safetensors is the new value of the whole parameter
    (the task head, BitFit's biases, HiWi's new FFN biases);
  - ``"scatter"``: ``NAME.indices`` (int32 or int64 flat positions) and ``NAME.values`` (the new entries):
    ``param.view(-1)[indices] = values`` (PaFi's sparse entries; every other entry keeps its pretrained value);
  - ``"row_adapter"``: ``NAME.down`` (width x r) and ``NAME.up`` (r x width), the HiWi adapter of the parameter:
    ``P <- P + relu(P_rows @ down) @ up``, row by row over the last dimension (a vector is one row).

* ``delta.safetensors``: the tensors named above.

``apply_delta`` checks every name and shape against the model before it changes anything, then writes the new
values in place and returns the model.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "peftkit-delta"
VERSION = 1
MANIFEST = "delta.json"
TENSORS = "delta.safetensors"
OPS = {"replace": ("",), "scatter": (".indices", ".values"), "row_adapter": (".down", ".up")}


def write_delta(directory, entries: dict) -> dict:
    """Write ``entries`` (NAME -> (OP, {suffix: tensor})) as delta.json + delta.safetensors; return the manifest."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors, manifest = {}, {"format": FORMAT, "version": VERSION, "tensors": {}}
    for name, (op, parts) in entries.items():
        if op not in OPS or set(parts) != set(OPS[op]):
            raise ValueError(f"delta entry {name!r}: op {op!r} with parts {sorted(parts)} is not one of {OPS}")
        manifest["tensors"][name] = op
        for suffix, tensor in parts.items():
            tensors[name + suffix] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(directory / TENSORS), metadata={"format": FORMAT, "version": str(VERSION)})
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_delta(directory):
    """(manifest, tensors) of a delta directory, checked for a known format and complete parts."""
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{directory / MANIFEST} is not a {FORMAT} version {VERSION} manifest")
    ops = manifest.get("tensors")
    if not isinstance(ops, dict):
        raise ValueError(f"{directory / MANIFEST} has no 'tensors' object")
    tensors = load_file(str(directory / TENSORS))
    for name, op in ops.items():
        if op not in OPS:
            raise ValueError(f"{directory / MANIFEST}: {name!r} has the unknown op {op!r} (known: {', '.join(OPS)})")
        missing = [name + s for s in OPS[op] if name + s not in tensors]
        if missing:
            raise ValueError(f"{directory / TENSORS} lacks {missing}")
    return manifest, tensors


def apply_delta(model, directory):
    """Apply the delta in ``directory`` to ``model`` (its base model, as transformers loads it), in place."""
    import torch

    manifest, tensors = read_delta(directory)
    params = dict(model.named_parameters())
    for name, op in manifest["tensors"].items():  # check everything before changing anything
        if name not in params:
            raise ValueError(f"the delta changes {name!r}, which this model does not have: is it the right base?")
        param = params[name]
        if op == "replace":
            ok = tensors[name].shape == param.shape
        elif op == "scatter":
            idx = tensors[name + ".indices"]
            ok = idx.numel() == tensors[name + ".values"].numel() and (idx.numel() == 0 or int(idx.max()) < param.numel())
        else:
            ok = (tensors[name + ".down"].shape[0] == param.shape[-1]
                  and tensors[name + ".up"].shape == (tensors[name + ".down"].shape[1], param.shape[-1]))
        if not ok:
            raise ValueError(f"the delta of {name!r} does not fit the model's tensor of shape {tuple(param.shape)}")
    with torch.no_grad():
        for name, op in manifest["tensors"].items():
            param = params[name]
            if op == "replace":
                param.copy_(tensors[name].to(param))
            elif op == "scatter":
                flat = param.data.view(-1)
                flat[tensors[name + ".indices"].to(device=param.device, dtype=torch.long)] = \
                    tensors[name + ".values"].to(param)
            else:
                down, up = tensors[name + ".down"].to(param), tensors[name + ".up"].to(param)
                value = param.detach()
                rows = value.reshape(-1, value.shape[-1])
                param.copy_(value + (torch.relu(rows @ down) @ up).reshape(value.shape))
    return model
