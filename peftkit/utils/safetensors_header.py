"""Whether a file is a well-formed safetensors file, from its header alone (no tensor data is read).

Below the model loaders (models/load.py, models/aliases.py), which both check files with it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit on the JSON header
# bytes per element of each safetensors dtype (sub-byte float formats are left out: their sizes are not per element)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def check_safetensors_file(path: Path) -> None:
    """Raise ValueError when ``path`` is not a well-formed safetensors file (header parse, offsets, exact size).

    Catches truncated and overwritten files without reading the tensor data; a bit flip inside the data
    itself is not detectable (the format carries no checksum).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    end_of_data = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape, dtype = info["shape"], info["dtype"]
            ok = (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                  and all(isinstance(d, int) and d >= 0 for d in shape))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"tensor {key!r} has a malformed header entry")
        if dtype in _DTYPE_BYTES:
            count = 1
            for d in shape:
                count *= d
            if count * _DTYPE_BYTES[dtype] != end - begin:
                raise ValueError(f"tensor {key!r} ({dtype}, shape {shape}) does not match its {end - begin} bytes")
        end_of_data = max(end_of_data, end)
    if 8 + n + end_of_data != size:
        raise ValueError(f"the header describes {8 + n + end_of_data} bytes, the file has {size} (truncated or padded)")
