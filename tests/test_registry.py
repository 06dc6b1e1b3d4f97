"""The plugin registry: names read from the source, one module imported per lookup, suggestions for typos."""

import subprocess
import sys

import pytest

from peftkit.errors import UserError
from peftkit.utils.registry import BENCHES, METHODS, TASKS


def test_every_registration_is_found_in_module_order():
    assert METHODS.names() == ["apiq", "bitfit", "full", "head-only", "hiwi", "lora", "meft1", "meft2", "meft3", "pafi",
                               "supertuning"]
    assert {"sst2", "mrpc", "wikitext2", "mlm", "calibration", "dataset"} <= set(TASKS.names())
    assert BENCHES.names() == ["flops", "glue", "latency", "memory", "merge", "peers", "quant", "step"]
    assert METHODS.help("pafi").startswith("PaFi:") and METHODS.get("meft2").name == "meft2"


def test_a_lookup_imports_only_the_module_it_needs():
    code = ("import sys; from peftkit.utils.registry import METHODS; names = METHODS.names(); "
            "METHODS.get('lora'); print(sorted(m for m in ('torch', 'peftkit.methods.pafi', 'peftkit.methods.meft') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_an_unknown_name_is_a_user_error_with_a_suggestion():
    with pytest.raises(UserError, match='unknown method "lorra" \\(did you mean "lora"\\?\\)'):
        METHODS.get("lorra")
