"""Greedy or sampled answers from a Hugging Face checkpoint, prompted as in training.

Generation runs the model in eval mode through ``transformers``: no noise is ever applied.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from symnoise_megatron.data.templates import Example, Turn, get_template
from symnoise_megatron.data.tokenizer import TokenizerSpec
from symnoise_megatron.evaluation.records import read_records, write_records


def prompt_text(template_name: str, instruction: str, context: str = "") -> str:
    """The prompt the model saw in training: the template up to where the response starts."""
    segments = get_template(template_name).render(Example([Turn(instruction, "", context)]))
    return "".join(s.text for s in segments if not s.is_response)


class Generator:
    def __init__(self, hf_dir: str, template: str = "alpaca", seed: int = 0):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        self.model.eval()
        self.tokenizer = TokenizerSpec(directory=hf_dir).load()
        self.template = get_template(template)
        self.seed = seed

    def answer(self, instructions: List[str], max_new_tokens: int = 64, temperature: float = 0.0,
               contexts: Optional[List[str]] = None) -> List[str]:
        contexts = contexts or [""] * len(instructions)
        answers = []
        for instruction, context in zip(instructions, contexts):
            ids = self.tokenizer.encode([prompt_text(self.template.name, instruction, context)])[0]
            if self.template.add_bos and self.tokenizer.bos_id is not None:
                ids = [self.tokenizer.bos_id] + ids
            torch.manual_seed(self.seed)
            with torch.no_grad():
                output = self.model.generate(
                    torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                    eos_token_id=self.tokenizer.eos_id, pad_token_id=self.tokenizer.eos_id,
                )
            new = [t for t in output[0, len(ids):].tolist() if t != self.tokenizer.eos_id]
            answers.append(self.tokenizer.decode(new).strip())
        return answers


def read_prompts(path: str) -> List[dict]:
    """AlpacaEval's prompt file (a JSON list of objects with ``instruction``) or JSONL."""
    return read_records(path, "instruction")


def generate_file(generator: "Generator", prompts_path: str, output_path: str, name: str,
                  max_new_tokens: int = 256, temperature: float = 0.0, limit: Optional[int] = None,
                  progress: bool = True) -> List[dict]:
    """Answer every prompt into AlpacaEval's model-outputs JSON, resuming a partial file.

    The output is rewritten (atomically) after each answer, so an interrupted run keeps
    what it did; answered prompts (same position, same instruction) are skipped.
    """
    import os

    from tqdm import tqdm

    prompts = read_prompts(prompts_path)[:limit]
    done: List[dict] = []
    if os.path.exists(output_path):
        done = read_records(output_path, "instruction")
        for index, row in enumerate(done):
            if index >= len(prompts) or row.get("instruction") != prompts[index]["instruction"]:
                raise ValueError(f"{output_path}: row {index + 1} does not answer {prompts_path}'s row {index + 1}; "
                                 "use another output file")
    for prompt in tqdm(prompts[len(done):], desc="generate", disable=not progress, initial=len(done), total=len(prompts)):
        answer = generator.answer([prompt["instruction"]], max_new_tokens, temperature, [prompt.get("input", "")])[0]
        done.append({"instruction": prompt["instruction"], "output": answer, "generator": name,
                     "dataset": prompt.get("dataset", "")})
        write_records(done, output_path)
    return done
