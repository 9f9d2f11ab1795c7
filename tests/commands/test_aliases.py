"""In a checkout, tools/*.py and ``python -m symnoise_megatron.finetune`` run the commands
themselves: each alias's ``main`` is its command's."""

import importlib

import pytest

ALIASES = {
    "tools.preprocess_data": "preprocess", "tools.convert_checkpoint": "convert", "tools.verify_checkpoint": "verify",
    "tools.generate": "generate", "tools.evaluate": "evaluate", "tools.text_metrics": "metrics", "tools.compare_runs": "compare",
    "tools.split_records": "split", "tools.plan_layout": "plan", "tools.materialize_model": "materialize",
    "tools.inspect_path": "inspect_path",
    "symnoise_megatron.finetune": "finetune",
}


@pytest.mark.parametrize("alias, command", ALIASES.items())
def test_the_alias_runs_the_command(alias, command):
    assert importlib.import_module(alias).main is importlib.import_module(f"symnoise_megatron.commands.{command}").main
