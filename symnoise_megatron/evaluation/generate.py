"""Greedy or sampled answers from a Hugging Face checkpoint, prompted as in training.

Two engines answer the prompts: ``transformers`` (the model in eval mode, so no noise is ever
applied; batched with left padding) and ``vllm``, a thin adapter for GPU clusters (the 805
AlpacaEval prompts at 1,024 new tokens are hours with transformers at batch 1 on a 7B model).

A model-outputs file is resumable, and it is written by one generator only: its identity
(the model, the checkpoint iteration when it came from a megatron directory, the template
and the decoding settings) is kept beside it in ``OUTPUT.meta``, and a resume with another
identity is refused, naming the fields that differ.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from symnoise_megatron.data.templates import Example, Turn, get_template
from symnoise_megatron.data.tokenizer import TokenizerSpec
from symnoise_megatron.evaluation.records import meta_path, read_records, write_json, write_records

ENGINES = ("auto", "transformers", "vllm")
DEFAULT_PROMPT_TEMPLATE = "alpaca"
# Prompts sorted by length within windows of this many batches: long enough windows pad
# little, short enough that an interrupted run loses little (answers are written in prompt
# order, so a window's answers reach the file once the prompts before them are answered).
WINDOW_BATCHES = 8


def prompt_text(template_name: str, instruction: str, context: str = "") -> str:
    """The prompt the model saw in training: the template up to where the response starts."""
    segments = get_template(template_name).render(Example([Turn(instruction, "", context)]))
    return "".join(s.text for s in segments if not s.is_response)


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"--repetition-penalty must be positive (1 means none), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class _Engine:
    """What both engines share: the prompt's token ids and the answer's text."""

    engine = ""

    def __init__(self, hf_dir: str, template: str, seed: int, source: Optional[dict]):
        self.tokenizer = TokenizerSpec(directory=hf_dir).load()
        self.template = get_template(template)
        self.seed = seed
        # Where the weights came from: the HF directory, or the megatron directory and its
        # iteration when ``hf_dir`` is a conversion made on the fly.
        self.source = source or model_source(hf_dir)

    def prompt_ids(self, instruction: str, context: str = "") -> List[int]:
        ids = self.tokenizer.encode([prompt_text(self.template.name, instruction, context)])[0]
        if self.template.add_bos and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def _until_eos(self, new_ids: List[int]) -> List[int]:
        eos = self.tokenizer.eos_id
        return new_ids[:new_ids.index(eos)] if eos in new_ids else new_ids

    def identity(self, decoding: Decoding) -> Dict:
        return generator_identity(self.source, self.template.name, self.seed, decoding)


def prompt_template_for(requested: Optional[str], megatron_dir: Optional[str], warn) -> str:
    """``requested`` (--prompt-template), else the template a --megatron-dir checkpoint was fine-tuned
    with (recorded at each save), else alpaca. Asking a fine-tune in another format than its
    training data's is allowed, as a deliberate probe, but said through ``warn``."""
    from symnoise_megatron.checkpoint.paths import read_info

    trained = read_info(megatron_dir).get("prompt_template") if megatron_dir else None
    if requested and trained and requested != trained:
        warn(f"WARNING: --prompt-template {requested}, but {megatron_dir} was fine-tuned on {trained} prompts")
    if requested or trained:
        return requested or trained
    warn(f"note: no training template is recorded for this model: prompts use {DEFAULT_PROMPT_TEMPLATE}'s format "
         "(pass --prompt-template to choose)")
    return DEFAULT_PROMPT_TEMPLATE


def model_source(hf_dir: Optional[str] = None, megatron_dir: Optional[str] = None) -> Dict:
    """The weights' origin in a generator's identity: the directory and, for a megatron
    checkpoint, the iteration its tracker names (``release`` for a converted one)."""
    if megatron_dir is None:
        return {"model": os.path.abspath(hf_dir), "checkpoint_iteration": None}
    from symnoise_megatron.checkpoint.paths import read_tracker

    iteration = read_tracker(megatron_dir)
    return {"model": os.path.abspath(megatron_dir), "checkpoint_iteration": "release" if iteration is None else iteration}


@contextlib.contextmanager
def converted_to_hf(megatron_dir: str, source: Dict):
    """The checkpoint that ``source`` names (its latest iteration), converted into a temporary
    Hugging Face directory. A checkpoint saved meanwhile is refused: the answers would come
    from other weights than the identity names."""
    from symnoise_megatron.checkpoint.convert import megatron_to_hf
    from symnoise_megatron.runtime.cpu import runtime_for_this_machine

    with tempfile.TemporaryDirectory() as hf_dir:
        with runtime_for_this_machine():
            megatron_to_hf(megatron_dir, hf_dir, progress=False)
        if model_source(megatron_dir=megatron_dir) != source:
            raise ValueError(f"{megatron_dir}: a new checkpoint was saved while it was being converted; run again")
        yield hf_dir


def generator_identity(source: Dict, template: str, seed: int, decoding: Decoding) -> Dict:
    """What decides the answers: the weights' origin, the template, the decoding settings
    (the seed, temperature and top-p only when sampling)."""
    identity = dict(source, template=template, max_new_tokens=decoding.max_new_tokens,
                    decoding="greedy" if decoding.greedy else "sampling", repetition_penalty=decoding.repetition_penalty)
    if not decoding.greedy:
        identity.update(temperature=decoding.temperature, top_p=decoding.top_p, seed=seed)
    return identity


class Generator(_Engine):
    """transformers' ``generate`` on the CPU or one GPU, in eval mode, batched with left padding."""

    engine = "transformers"

    def __init__(self, hf_dir: str, template: str = DEFAULT_PROMPT_TEMPLATE, seed: int = 0, source: Optional[dict] = None):
        from transformers import AutoModelForCausalLM

        super().__init__(hf_dir, template, seed, source)
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        self.model.eval()
        if torch.cuda.is_available():
            self.model.cuda()

    def answer(self, instructions: List[str], max_new_tokens: int = 64, temperature: float = 0.0,
               contexts: Optional[List[str]] = None, *, top_p: float = 1.0, repetition_penalty: float = 1.0,
               batch_size: int = 1) -> List[str]:
        """Answers in the order of ``instructions``, generated ``batch_size`` at a time, shortest
        prompts first. Greedy answers match batch 1's unless padding's change of float order
        flips a near-tie; sampled ones depend on the batch (the seed is set once per batch)."""
        contexts = contexts or [""] * len(instructions)
        ids = [self.prompt_ids(instruction, context) for instruction, context in zip(instructions, contexts)]
        decoding = Decoding(max_new_tokens, temperature, top_p, repetition_penalty)
        return [self.tokenizer.decode(new).strip() for new in self.answer_ids(ids, decoding, batch_size)]

    def answer_ids(self, prompts: List[List[int]], decoding: Decoding, batch_size: int = 1) -> List[List[int]]:
        """The new token ids for each prompt (up to its first EOS), in the order given."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: List[List[int]] = [[] for _ in prompts]
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, new in zip(chunk, self._batch([prompts[i] for i in chunk], decoding)):
                answers[i] = new
        return answers

    def _batch(self, batch: List[List[int]], decoding: Decoding) -> List[List[int]]:
        # Left padding keeps each prompt's last token at the end, where generation continues;
        # the attention mask hides the pads, and transformers derives positions from it and
        # leaves the pads out of the repetition penalty.
        pad = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        width = max(len(ids) for ids in batch)
        device = self.model.device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        torch.manual_seed(self.seed)
        with torch.no_grad():
            output = self.model.generate(
                input_ids, attention_mask=mask, max_new_tokens=decoding.max_new_tokens, do_sample=not decoding.greedy,
                temperature=None if decoding.greedy else decoding.temperature,
                top_p=None if decoding.greedy else decoding.top_p, top_k=None,
                repetition_penalty=decoding.repetition_penalty, eos_token_id=self.tokenizer.eos_id, pad_token_id=pad,
            )
        return [self._until_eos(row[width:].tolist()) for row in output]


class VLLMGenerator(_Engine):
    """vLLM's offline ``LLM.generate`` (GPU clusters). A thin adapter, not tested in this
    project's CI: vLLM needs a GPU. It schedules and batches the prompts it is given itself
    (continuous batching), so ``batch_size`` only sets how many prompts it gets at a time.
    Its ``repetition_penalty`` is transformers' (prompt and answer tokens both count); a
    sampled answer is seeded per request, so it does not depend on the batch."""

    engine = "vllm"

    def __init__(self, hf_dir: str, template: str = DEFAULT_PROMPT_TEMPLATE, seed: int = 0, source: Optional[dict] = None):
        from vllm import LLM

        super().__init__(hf_dir, template, seed, source)
        self.llm = LLM(model=hf_dir, tokenizer=hf_dir, seed=seed)

    def answer(self, instructions: List[str], max_new_tokens: int = 64, temperature: float = 0.0,
               contexts: Optional[List[str]] = None, *, top_p: float = 1.0, repetition_penalty: float = 1.0,
               batch_size: int = 1) -> List[str]:
        from vllm import SamplingParams

        contexts = contexts or [""] * len(instructions)
        greedy = temperature == 0
        params = SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, top_p=1.0 if greedy else top_p,
            repetition_penalty=repetition_penalty, seed=None if greedy else self.seed,
            stop_token_ids=[self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else None,
        )
        prompts = [{"prompt_token_ids": self.prompt_ids(i, c)} for i, c in zip(instructions, contexts)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self.tokenizer.decode(self._until_eos(list(output.outputs[0].token_ids))).strip() for output in outputs]


def resolve_engine(engine: str) -> str:
    """``auto``: vLLM when it is installed and a GPU is there, else transformers."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if engine == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"
    if engine == "vllm" and not has_vllm:
        raise ValueError("--engine vllm: the vllm package is not installed (pip install vllm, on a GPU machine)")
    return engine


def make_generator(hf_dir: str, template: str = DEFAULT_PROMPT_TEMPLATE, seed: int = 0, engine: str = "auto",
                   source: Optional[dict] = None) -> _Engine:
    cls = VLLMGenerator if resolve_engine(engine) == "vllm" else Generator
    return cls(hf_dir, template, seed, source)


def read_prompts(path: str) -> List[dict]:
    """AlpacaEval's prompt file (a JSON list of objects with ``instruction``) or JSONL."""
    return read_records(path, "instruction")


def _check_generator(output_path: str, identity: Dict, answered: int) -> None:
    path = meta_path(output_path)
    if not answered:  # nothing to mix with: the record is rewritten for this generator
        return
    if not os.path.exists(path):
        raise ValueError(f"{output_path}: no {os.path.basename(path)} beside it, so the generator of its {answered} "
                         "answers is unknown; use another output file (or delete this one to start over)")
    try:
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle)["generator"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}: not a generator record written by tools/generate.py") from None
    differ = [f"{key}: {recorded.get(key)!r} then, {identity.get(key)!r} now"
              for key in sorted(set(recorded) | set(identity)) if recorded.get(key) != identity.get(key)]
    if differ:
        raise ValueError(f"{output_path}: its answers came from another generator ({'; '.join(differ)}); "
                         "use another output file, or the settings recorded in " + path)


def answered_rows(output_path: str, prompts: List[dict], prompts_path: str, identity: Dict) -> List[dict]:
    """The rows of a partial ``output_path`` to resume from (none if it does not exist),
    refused unless they answer the first prompts and came from the generator ``identity``.
    Cheap: call it before loading a model."""
    if not os.path.exists(output_path):
        return []
    done = read_records(output_path, "instruction", allow_empty=True)
    _check_generator(output_path, identity, len(done))
    for index, row in enumerate(done):
        if index >= len(prompts) or row.get("instruction") != prompts[index]["instruction"]:
            raise ValueError(f"{output_path}: row {index + 1} does not answer {prompts_path}'s row {index + 1}; "
                             "use another output file")
    return done


def generate_file(generator: _Engine, prompts_path: str, output_path: str, name: str,
                  max_new_tokens: int = 256, temperature: float = 0.0, limit: Optional[int] = None,
                  progress: bool = True, *, top_p: float = 1.0, repetition_penalty: float = 1.0,
                  batch_size: int = 1) -> List[dict]:
    """Answer every prompt into AlpacaEval's model-outputs JSON, resuming a partial file.

    The file always holds the answers to a prefix of the prompts, in prompt order, rewritten
    atomically after each batch, so an interrupted run keeps what it did; answered prompts
    (same position, same instruction) are skipped. Prompts are sorted by length within
    windows of ``WINDOW_BATCHES`` batches, so that a batch pads little.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    decoding = Decoding(max_new_tokens, temperature, top_p, repetition_penalty)
    identity = generator.identity(decoding)
    prompts = read_prompts(prompts_path)[:limit]
    done = answered_rows(output_path, prompts, prompts_path, identity)
    write_json({"generator": identity, "engine": generator.engine, "batch_size": batch_size}, meta_path(output_path))

    remaining = list(range(len(done), len(prompts)))
    window = batch_size * WINDOW_BATCHES if batch_size > 1 else 1
    finished: Dict[int, dict] = {}
    with tqdm(desc="generate", disable=not progress, initial=len(done), total=len(prompts)) as bar:
        for start in range(0, len(remaining), window):
            lengths = {i: len(generator.prompt_ids(prompts[i]["instruction"], prompts[i].get("input", "")))
                       for i in remaining[start:start + window]}
            chunk = sorted(lengths, key=lengths.get)
            for first in range(0, len(chunk), batch_size):
                batch = chunk[first:first + batch_size]
                answers = generator.answer([prompts[i]["instruction"] for i in batch], max_new_tokens, temperature,
                                           [prompts[i].get("input", "") for i in batch], top_p=top_p,
                                           repetition_penalty=repetition_penalty, batch_size=len(batch))
                for i, answer in zip(batch, answers):
                    finished[i] = {"instruction": prompts[i]["instruction"], "output": answer, "generator": name,
                                   "dataset": prompts[i].get("dataset", "")}
                before = len(done)
                while len(done) in finished:
                    done.append(finished.pop(len(done)))
                if len(done) > before:
                    write_records(done, output_path)
                bar.update(len(batch))
    if not os.path.exists(output_path):
        write_records(done, output_path)
    return done
