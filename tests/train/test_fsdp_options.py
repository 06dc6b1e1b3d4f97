"""The FSDP options of the train section: they only mean something under train.strategy=fsdp."""

import pytest

from peftkit.config.loader import load_recipe
from peftkit.errors import UserError

BASE = {"model": {"name": "prajjwal1/bert-tiny"}, "method": {"name": "lora"}, "data": {"task": "sst2"}}


@pytest.mark.parametrize("override", ["train.fsdp_mixed_precision=bf16", "train.fsdp_cpu_offload=true"])
def test_fsdp_option_without_fsdp_is_refused(override):
    with pytest.raises(UserError) as error:
        load_recipe(BASE, [override])
    message = str(error.value)
    assert override.split("=")[0].removeprefix("train.") in message and "train.strategy=fsdp" in message


def test_fsdp_options_with_fsdp():
    recipe = load_recipe(BASE, ["train.strategy=fsdp", "train.fsdp_mixed_precision=bf16", "train.fsdp_cpu_offload=true"])
    assert recipe.train.fsdp_mixed_precision == "bf16" and recipe.train.fsdp_cpu_offload is True
    # offload moves the shards, not the arithmetic: it is not part of the settings a resume checks
    offloaded = recipe.result_settings()
    recipe.train.fsdp_cpu_offload = False
    assert recipe.result_settings() == offloaded
