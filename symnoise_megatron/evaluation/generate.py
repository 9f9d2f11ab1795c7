"""Greedy or sampled answers from a Hugging Face checkpoint, prompted as in training.

Two engines answer the prompts: ``transformers`` (the model in eval mode, so no noise is ever
applied; batched with left padding; on GPUs in bf16 with its layers spread over the visible
GPUs, ``device_map="auto"``) and ``vllm``, a thin adapter for GPU clusters (the 805 AlpacaEval
prompts at 1,024 new tokens are hours with transformers at batch 1 on a 7B model; a 70B needs
tensor parallelism, ``EngineSettings.tensor_parallel_size``).

A model-outputs file is resumable, and it is written by one generator only: its identity
(the model, the checkpoint iteration when it came from a megatron directory, the template,
the decoding settings, the engine and its settings) is kept beside it in ``OUTPUT.meta``, and
a resume with another identity is refused, naming the fields that differ.
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

from symnoise_megatron.common.extras import require
from symnoise_megatron.data.templates import Example, Turn, get_template, stop_ids
from symnoise_megatron.data.tokenizer import TokenizerSpec
from symnoise_megatron.evaluation.records import meta_path, read_records, write_json, write_records

ENGINES = ("auto", "transformers", "vllm")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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


@dataclass(frozen=True)
class EngineSettings:
    """How the weights run. Part of the generator's identity: another dtype or another tensor
    parallel layout sums in another order, and a greedy near-tie can flip.

    Attributes:
        engine: ``transformers`` or ``vllm`` (``resolve_engine`` picks one for ``auto``).
        dtype: ``bf16``, ``fp16`` or ``fp32``; ``auto`` (default): bf16 on GPUs, fp32 on CPU.
        tensor_parallel_size: vLLM's GPUs per model (default 1; a 70B in bf16 needs 4 x 80 GB,
            8 with room for the KV cache). transformers spreads a model over the visible GPUs
            by layers instead (``device_map="auto"``).
        max_model_len: vLLM's longest prompt + answer in tokens (default: the model's
            ``max_position_embeddings``); lower it to leave memory for the KV cache.
    """

    engine: str = "transformers"
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None

    def __post_init__(self):
        if self.engine not in ("transformers", "vllm"):
            raise ValueError(f"unknown engine {self.engine!r}; use transformers or vllm (or resolve auto first)")
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", "bf16" if torch.cuda.is_available() else "fp32")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be at least 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len must be at least 1, got {self.max_model_len}")
        if self.engine == "transformers" and (self.tensor_parallel_size > 1 or self.max_model_len is not None):
            flag = "--tensor-parallel-size" if self.tensor_parallel_size > 1 else "--max-model-len"
            raise ValueError(f"{flag} is vLLM's (--engine vllm); the transformers engine spreads a model over the "
                             "visible GPUs by layers (device_map=auto) and takes no such setting")

    def identity(self) -> Dict:
        fields = {"engine": self.engine, "dtype": self.dtype}
        if self.engine == "vllm":
            fields.update(tensor_parallel_size=self.tensor_parallel_size, max_model_len=self.max_model_len)
        return fields


class _Engine:
    """What both engines share: the prompt's token ids and the answer's text."""

    engine = ""

    def __init__(self, hf_dir: str, template: str, seed: int, source: Optional[dict], settings: EngineSettings):
        if settings.engine != self.engine:
            raise ValueError(f"settings for the {settings.engine} engine given to the {self.engine} engine")
        self.tokenizer = TokenizerSpec(directory=hf_dir).load()
        self.template = get_template(template)
        self.seed = seed
        # Where the weights came from: the HF directory, or the megatron directory and its
        # iteration when ``hf_dir`` is a conversion made on the fly.
        self.source = source or model_source(hf_dir)
        self.settings = settings
        # What ends an answer: EOS, and the template's own end of response (ChatML's <|im_end|>).
        self.stop_ids = stop_ids(self.template, self.tokenizer)

    def prompt_ids(self, instruction: str, context: str = "") -> List[int]:
        ids = self.tokenizer.encode([prompt_text(self.template.name, instruction, context)])[0]
        if self.template.add_bos and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def until_stop(self, new_ids: List[int]) -> List[int]:
        """``new_ids`` up to the first stop id."""
        for index, token in enumerate(new_ids):
            if token in self.stop_ids:
                return new_ids[:index]
        return new_ids

    def identity(self, decoding: Decoding) -> Dict:
        return generator_identity(self.source, self.template.name, self.seed, decoding, self.settings)


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
def converted_to_hf(megatron_dir: str, source: Dict, export_dir: Optional[str] = None):
    """The checkpoint that ``source`` names (its latest iteration), converted into a temporary
    Hugging Face directory inside ``export_dir`` (default: the system's temporary folder),
    removed afterwards. It takes the model's size on disk (140 GB for a 70B in bf16). A
    checkpoint saved meanwhile is refused: the answers would come from other weights than the
    identity names."""
    from symnoise_megatron.checkpoint.convert import megatron_to_hf
    from symnoise_megatron.runtime.cpu import runtime_for_this_machine

    if export_dir is not None and not os.path.isdir(export_dir):
        raise ValueError(f"--export-dir {export_dir} is not an existing folder")
    with tempfile.TemporaryDirectory(prefix="symnoise-export-", dir=export_dir) as hf_dir:
        with runtime_for_this_machine():
            megatron_to_hf(megatron_dir, hf_dir, progress=False)
        if model_source(megatron_dir=megatron_dir) != source:
            raise ValueError(f"{megatron_dir}: a new checkpoint was saved while it was being converted; run again")
        yield hf_dir


def generator_identity(source: Dict, template: str, seed: int, decoding: Decoding, settings: EngineSettings) -> Dict:
    """What decides the answers: the weights' origin, the template, the decoding settings
    (the seed, temperature and top-p only when sampling), the engine and its settings."""
    identity = dict(source, template=template, max_new_tokens=decoding.max_new_tokens,
                    decoding="greedy" if decoding.greedy else "sampling", repetition_penalty=decoding.repetition_penalty)
    if not decoding.greedy:
        identity.update(temperature=decoding.temperature, top_p=decoding.top_p, seed=seed)
    identity.update(settings.identity())
    return identity


def _real_token_repetition_penalty(penalty: float, pads: List[int]):
    """transformers' repetition penalty (CTRL's, ``RepetitionPenaltyLogitsProcessor``) over each
    row's real tokens only.

    Left padding fills a row's first ``pads[row]`` positions with the pad id (EOS), and
    transformers' processor counts every id in ``input_ids``: a padded row's EOS would be
    penalised at every step, and its answer run longer than at batch 1. Here each pad is
    replaced by the row's first real token before the penalty looks, which leaves the set of
    ids it sees exactly the row's own (the attention mask already hides the pads from the model).
    """
    from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor

    class RealTokenRepetitionPenalty(LogitsProcessor):
        def __init__(self):
            self.penalty = RepetitionPenaltyLogitsProcessor(penalty)
            self.pads = torch.tensor(pads)[:, None]

        def __call__(self, input_ids, scores):
            pads = self.pads.to(input_ids.device)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            real = torch.where(positions < pads, input_ids.gather(1, pads), input_ids)
            return self.penalty(real, scores)

    return RealTokenRepetitionPenalty()


class Generator(_Engine):
    """transformers' ``generate`` in eval mode, batched with left padding: on the CPU, or on
    the visible GPUs with the layers spread over them (``device_map="auto"``, accelerate)."""

    engine = "transformers"

    def __init__(self, hf_dir: str, template: str = DEFAULT_PROMPT_TEMPLATE, seed: int = 0, source: Optional[dict] = None,
                 settings: Optional[EngineSettings] = None):
        from transformers import AutoModelForCausalLM, GenerationConfig

        super().__init__(hf_dir, template, seed, source, settings or EngineSettings("transformers"))
        placement = {}
        if torch.cuda.is_available():
            require("accelerate", "the transformers engine places a model on GPUs with device_map=auto", extra="eval")
            placement = {"device_map": "auto"}
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=DTYPES[self.settings.dtype], **placement)
        self.model.eval()
        # The decoding is this generator's settings alone, never the directory's
        # generation_config.json (an export carries NEFTune's there, a base model its sampling).
        self.model.generation_config = GenerationConfig()

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
        # the attention mask hides the pads from the model (transformers derives positions from
        # it) and the repetition penalty looks at the real tokens only.
        from transformers import LogitsProcessorList

        pad = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        width = max(len(ids) for ids in batch)
        pads = [width - len(ids) for ids in batch]
        device = self.model.device
        input_ids = torch.tensor([[pad] * count + ids for count, ids in zip(pads, batch)], device=device)
        mask = torch.tensor([[0] * count + [1] * len(ids) for count, ids in zip(pads, batch)], device=device)
        processors = LogitsProcessorList()
        if decoding.repetition_penalty != 1.0:
            processors.append(_real_token_repetition_penalty(decoding.repetition_penalty, pads))
        # Sampling is temperature and top-p alone, as vLLM's (transformers would add top-k 50).
        sampling = {} if decoding.greedy else {"temperature": decoding.temperature, "top_p": decoding.top_p, "top_k": 0}
        torch.manual_seed(self.seed)
        with torch.no_grad():
            output = self.model.generate(
                input_ids, attention_mask=mask, max_new_tokens=decoding.max_new_tokens, do_sample=not decoding.greedy,
                logits_processor=processors, eos_token_id=self.stop_ids or None, pad_token_id=pad, **sampling,
            )
        return [self.until_stop(row[width:].tolist()) for row in output]


def vllm_engine_arguments(hf_dir: str, settings: EngineSettings, seed: int) -> Dict:
    """The arguments of vLLM's ``LLM``. Its sampling defaults from the directory's
    generation_config.json are switched off (``generation_config="vllm"``): the decoding is
    this generator's."""
    arguments = dict(model=hf_dir, tokenizer=hf_dir, seed=seed, dtype=DTYPES[settings.dtype],
                     tensor_parallel_size=settings.tensor_parallel_size, generation_config="vllm")
    if settings.max_model_len is not None:
        arguments["max_model_len"] = settings.max_model_len
    return arguments


def vllm_sampling_arguments(decoding: Decoding, seed: int, stop: List[int]) -> Dict:
    """The arguments of vLLM's ``SamplingParams``: greedy is temperature 0; a sampled answer is
    seeded per request (so it does not depend on the batch); it stops at the ``stop`` ids."""
    return dict(max_tokens=decoding.max_new_tokens, temperature=decoding.temperature,
                top_p=1.0 if decoding.greedy else decoding.top_p, repetition_penalty=decoding.repetition_penalty,
                seed=None if decoding.greedy else seed, stop_token_ids=stop or None)


class VLLMGenerator(_Engine):
    """vLLM's offline ``LLM.generate`` (GPU clusters). A thin adapter, tested by contract (the
    arguments it builds) in this project's CI, which has no GPU. It schedules and batches the
    prompts it is given itself (continuous batching), so ``batch_size`` only sets how many
    prompts it gets at a time. Its ``repetition_penalty`` is transformers' over the prompt and
    answer tokens (there is no padding to leave out)."""

    engine = "vllm"

    def __init__(self, hf_dir: str, template: str = DEFAULT_PROMPT_TEMPLATE, seed: int = 0, source: Optional[dict] = None,
                 settings: Optional[EngineSettings] = None):
        from vllm import LLM

        super().__init__(hf_dir, template, seed, source, settings or EngineSettings("vllm"))
        self.llm = LLM(**vllm_engine_arguments(hf_dir, self.settings, seed))

    def answer(self, instructions: List[str], max_new_tokens: int = 64, temperature: float = 0.0,
               contexts: Optional[List[str]] = None, *, top_p: float = 1.0, repetition_penalty: float = 1.0,
               batch_size: int = 1) -> List[str]:
        from vllm import SamplingParams

        contexts = contexts or [""] * len(instructions)
        decoding = Decoding(max_new_tokens, temperature, top_p, repetition_penalty)
        params = SamplingParams(**vllm_sampling_arguments(decoding, self.seed, self.stop_ids))
        prompts = [{"prompt_token_ids": self.prompt_ids(i, c)} for i, c in zip(instructions, contexts)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self.tokenizer.decode(self.until_stop(list(output.outputs[0].token_ids))).strip() for output in outputs]


def resolve_engine(engine: str) -> str:
    """``auto``: vLLM when it is installed and a GPU is there, else transformers."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if engine == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"
    if engine == "vllm" and not has_vllm:
        require("vllm", "--engine vllm, on a GPU machine, in an environment of its own")
    return engine


def make_generator(hf_dir: str, template: str = DEFAULT_PROMPT_TEMPLATE, seed: int = 0,
                   settings: Optional[EngineSettings] = None, source: Optional[dict] = None) -> _Engine:
    settings = settings or EngineSettings(resolve_engine("auto"))
    cls = VLLMGenerator if settings.engine == "vllm" else Generator
    return cls(hf_dir, template, seed, source, settings)


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
    # The docs write outputs/NAME.json: the folder is made, as --save's is.
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    write_json({"generator": identity, "batch_size": batch_size}, meta_path(output_path))

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
