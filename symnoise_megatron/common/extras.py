"""The optional packages and the extra of setup.py that installs each: one table, so that every
command that needs one says, in one line, which extra to install when it is missing.

Two ways in: ``require`` checks before any work starts (a fine-tune's ``--tensorboard-dir``);
every other import of an optional package simply happens where it is needed, and
``commands/errors.py`` turns the ModuleNotFoundError into ``missing_package_line``'s line.
"""

import importlib.util
from typing import Optional

DISTRIBUTION = "symnoise-megatron"

# Import name -> (the package pip installs, the extra that installs it). setup.py's extras_require
# is the source; tests/common/test_extras.py checks that each extra named here lists its package.
OPTIONAL = {
    "transformers": ("transformers", "eval"),
    "matplotlib": ("matplotlib", "eval"),
    "lm_eval": ("lm-eval", "eval"),
    "alpaca_eval": ("alpaca-eval", "eval"),
    "peft": ("peft", "eval"),
    "accelerate": ("accelerate", "gguf"),
    "gguf": ("gguf", "gguf"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "vllm": ("vllm", "vllm"),
    "transformer_engine": ("transformer-engine", "te"),
}

# Import name -> package of what `pip install .` installs (setup.py's install_requires): missing
# only from a broken environment.
REQUIRED = {
    "torch": "torch", "megatron": "megatron-core", "numpy": "numpy", "sentencepiece": "sentencepiece",
    "google": "protobuf", "tokenizers": "tokenizers", "datasets": "datasets", "safetensors": "safetensors",
    "tqdm": "tqdm", "yaml": "pyyaml", "psutil": "psutil",
}


class MissingExtra(ValueError):
    """An optional package is not installed; the message names the extra that installs it."""


def install_command(extra: str) -> str:
    return f'pip install "{DISTRIBUTION}[{extra}]"'


def missing_package_line(module: Optional[str], needed_for: Optional[str] = None,
                         extra: Optional[str] = None) -> Optional[str]:
    """One line saying what installs ``module`` (an import name, dotted or not), or None for a
    module that is neither optional nor required (a bug, not a missing install)."""
    top = (module or "").split(".")[0]
    purpose = f" ({needed_for})" if needed_for else ""
    if top in OPTIONAL:
        package, default_extra = OPTIONAL[top]
        extra = extra or default_extra
        return f"{package} is not installed{purpose}; the {extra} extra installs it: {install_command(extra)}"
    if top in REQUIRED:
        return (f"{REQUIRED[top]} is not installed{purpose}, though {DISTRIBUTION} requires it: "
                f"pip install {REQUIRED[top]}, or reinstall {DISTRIBUTION}")
    return None


def require(module: str, needed_for: str, extra: Optional[str] = None) -> None:
    """Raise MissingExtra, naming the extra, when ``module`` cannot be found (nothing is imported)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise MissingExtra(missing_package_line(module, needed_for, extra) or f"{module} is not installed ({needed_for})")
