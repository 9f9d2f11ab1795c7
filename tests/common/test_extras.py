"""A missing optional package is one line naming the extra of setup.py that installs it; the table
that says which extra agrees with setup.py."""

import ast
import os
import re

import pytest

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.common import extras

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup_keywords():
    """install_requires and extras_require, read from setup.py's setup() call."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords
            if keyword.arg in ("install_requires", "extras_require")}


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_each_extra_named_installs_its_package():
    extras_require = setup_keywords()["extras_require"]
    for module, (package, extra) in extras.OPTIONAL.items():
        assert package in {requirement_name(r) for r in extras_require[extra]}, (module, extra)


def test_each_required_package_is_in_install_requires():
    install_requires = {requirement_name(r) for r in setup_keywords()["install_requires"]}
    assert set(extras.REQUIRED.values()) == install_requires


def failing_command(module):
    @exits_on_user_error
    def main(argv=None):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    return main


def test_a_missing_optional_package_is_one_line_naming_its_extra(capsys):
    assert failing_command("transformers.models")() == 2
    assert capsys.readouterr().err == (
        'error: transformers is not installed; the eval extra installs it: pip install "symnoise-megatron[eval]"\n')
    assert failing_command("tensorboard")() == 2
    assert 'pip install "symnoise-megatron[tensorboard]"' in capsys.readouterr().err


def test_a_missing_module_of_the_package_itself_keeps_its_traceback():
    with pytest.raises(ModuleNotFoundError):
        failing_command("symnoise_megatron.no_such_module")()


def test_require_names_what_needs_the_package():
    extras.require("json", "anything")  # present: nothing happens
    with pytest.raises(extras.MissingExtra, match=r"^vllm is not installed \(--engine vllm\); the vllm extra installs it"):
        extras.OPTIONAL["symnoise_test_absent"] = ("vllm", "vllm")
        try:
            extras.require("symnoise_test_absent", "--engine vllm")
        finally:
            del extras.OPTIONAL["symnoise_test_absent"]
