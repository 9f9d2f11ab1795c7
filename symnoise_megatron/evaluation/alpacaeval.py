"""AlpacaEval win rates through the ``alpaca-eval`` package (Tables 1-3 of the paper).

One outputs file (``symnoise-generate``'s AlpacaEval model-outputs JSON) is judged against
reference outputs by one of alpaca-eval's annotators: its pairwise annotator
(``PairwiseAnnotator.annotate_head2head``, which randomises which answer the judge sees
first) and its metrics (``get_winrate``; ``get_length_controlled_winrate`` where it applies).
The annotations are cached by alpaca-eval itself (keyed by instruction, both outputs and the
annotator), so a rerun, or a run interrupted half way, pays only for what is not judged yet.

Everything that can be refused is checked before the judge runs and before anything is
written: the outputs file, the annotator's config, its API key, the reference outputs, and
whether the outputs answer the reference's instructions.

The default reference is what the paper used: text-davinci-003's answers to the 805
AlpacaEval instructions, i.e. AlpacaEval 1's reference (alpaca-eval's
``constants.ALPACAEVAL_REFERENCE_OUTPUTS_1``, the ``alpaca_eval`` configuration of the
``tatsu-lab/alpaca_eval`` data set on the Hugging Face hub). alpaca-eval 0.6.6 loads it with a
dataset script, which ``datasets`` 4 and later refuse; the file that script reads,
``alpaca_eval.json`` of that hub repository, is fetched here with ``huggingface_hub`` (cached
in the hub cache, so once per machine).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from symnoise_megatron.evaluation.alpaca_eval_import import alpaca_eval
from symnoise_megatron.evaluation.records import read_records, write_json, write_records

# Table 1 of the paper (and NEFTune's) judged with GPT-4: AlpacaEval 1's GPT-4 annotator.
DEFAULT_ANNOTATOR = "alpaca_eval_gpt4"
REFERENCE_REPOSITORY = "tatsu-lab/alpaca_eval"
REFERENCE_FILE = "alpaca_eval.json"
DEFAULT_REFERENCE = f"{REFERENCE_REPOSITORY}:{REFERENCE_FILE} (text-davinci-003, AlpacaEval 1)"
# The length-controlled GLM is fitted with each AlpacaEval instruction's difficulty, by position.
ALPACAEVAL_INSTRUCTIONS = 805

# What each of alpaca-eval's decoders needs in the environment before it can call its API.
# (bedrock_anthropic_completions uses boto3's credential chain, which is not checked here.)
API_KEYS: Dict[str, Tuple[str, ...]] = {
    "openai_completions": ("OPENAI_API_KEY", "OPENAI_API_KEYS"),
    "anthropic_completions": ("ANTHROPIC_API_KEY",),
    "google_completions": ("GOOGLE_API_KEY",),
    "cohere_completions": ("COHERE_API_KEY",),
    "huggingface_api_completions": ("HUGGINGFACEHUB_API_TOKEN",),
    "replicate_completions": ("REPLICATE_API_TOKEN",),
    "jina_chat_completions": ("JINA_CHAT_API_KEY",),
}


@dataclass
class AlpacaEvalConfig:
    """One judged outputs file.

    Attributes:
        model_outputs: AlpacaEval model-outputs JSON (``instruction``, ``output``, ``generator``).
        output: the results JSON to write; the annotations go beside it (``NAME.annotations.json``).
        reference_outputs: outputs to compare with; None: text-davinci-003's (module docstring).
        annotator: an alpaca-eval evaluator config name (``alpaca_eval_gpt4``, ``chatgpt``,
            ``weighted_alpaca_eval_gpt4_turbo``, ...) or a config directory / ``configs.yaml``.
        annotations_cache: alpaca-eval's annotation cache; None: ``alpaca_eval_cache/ANNOTATOR.json``
            beside ``output`` (shared by every outputs file judged into that folder).
        allow_partial: judge only the reference instructions the outputs answer (default: refuse
            outputs that answer part of the reference, which would not be AlpacaEval's win rate).
    """

    model_outputs: str
    output: str
    reference_outputs: Optional[str] = None
    annotator: str = DEFAULT_ANNOTATOR
    annotations_cache: Optional[str] = None
    allow_partial: bool = False


def annotations_path(output: str) -> str:
    stem = output[:-5] if output.endswith(".json") else output
    return stem + ".annotations.json"


def resolve_annotator(annotator: str) -> Tuple[str, Path]:
    """(name, configs.yaml path) of an evaluator config name or a user's config directory/file."""
    constants = alpaca_eval().constants
    candidate = Path(annotator)
    if os.sep in annotator or candidate.exists():
        path = candidate / "configs.yaml" if candidate.is_dir() else candidate
        if not path.is_file():
            raise ValueError(f"--annotator {annotator}: no {path.name} there (an alpaca-eval evaluator config "
                             "directory holds configs.yaml and its prompt)")
        return path.parent.name, path.resolve()
    path = Path(constants.EVALUATORS_CONFIG_DIR) / annotator / "configs.yaml"
    if not path.is_file():
        known = sorted(p.name for p in Path(constants.EVALUATORS_CONFIG_DIR).iterdir() if (p / "configs.yaml").is_file())
        raise ValueError(f"--annotator {annotator}: not one of alpaca-eval's evaluator configs ({', '.join(known)}) "
                         "nor a config directory")
    return annotator, path


def _annotator_configs(name: str, path: Path) -> Dict[str, dict]:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            configs = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"--annotator {name}: {path} cannot be read ({error})") from None
    if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
        raise ValueError(f"--annotator {name}: {path} is not a mapping of annotator name to its settings")
    return configs


def check_api_keys(name: str, configs: Dict[str, dict], environ=os.environ) -> None:
    """One line naming the variable when an annotator's API has no key in the environment."""
    for settings in configs.values():
        decoder = settings.get("fn_completions", "openai_completions")  # alpaca-eval's default
        variables = API_KEYS.get(decoder, ())
        if not variables or any(environ.get(v) for v in variables):
            continue
        if decoder == "openai_completions" and os.path.isfile(
                environ.get("OPENAI_CLIENT_CONFIG_PATH", str(alpaca_eval().constants.OPENAI_CLIENT_CONFIG_PATH))):
            continue  # alpaca-eval's client config file carries the keys
        also = (" (or OPENAI_CLIENT_CONFIG_PATH naming an alpaca-eval client config; a local vLLM server: "
                "OPENAI_API_BASE and any key)") if decoder == "openai_completions" else ""
        raise ValueError(f"--annotator {name} calls {decoder}, which needs {' or '.join(variables)} in the "
                         f"environment{also}")


def load_annotator(name: str, path: Path, cache: Optional[str]):
    """alpaca-eval's PairwiseAnnotator for the config (decoder imported, prompts read, cache loaded)."""
    package = alpaca_eval()
    from alpaca_eval.annotators import PairwiseAnnotator

    configs = _annotator_configs(name, path)
    if any(c.get("fn_completions") == "huggingface_local_completions" for c in configs.values()):
        from symnoise_megatron.evaluation.alpaca_eval_import import local_decoder_ready

        local_decoder_ready()
    try:
        annotator = PairwiseAnnotator(annotators_config=str(path), caching_path=cache,
                                      base_dir=package.constants.EVALUATORS_CONFIG_DIR)
    except Exception as error:  # alpaca-eval raises whatever its config reading meets: name it, no traceback
        detail = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(f"--annotator {name}: alpaca-eval cannot load {path} ({type(error).__name__}: {detail})") from None
    return annotator


def default_reference_path() -> str:
    """text-davinci-003's AlpacaEval outputs from the hub (cached); one line if it cannot be had."""
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=REFERENCE_REPOSITORY, filename=REFERENCE_FILE, repo_type="dataset")
    except Exception as error:  # offline, no such file, no hub access: all end the same way
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"the default reference outputs ({DEFAULT_REFERENCE}) could not be fetched ({detail}); "
                         "pass --reference-outputs FILE (AlpacaEval's model-outputs format)") from None


def _instructions(rows: List[dict], path: str) -> Dict[str, int]:
    """Instruction -> row index; a row without a string instruction, or a repeated one, is refused."""
    read = {}
    for number, row in enumerate(rows, start=1):
        instruction = row.get("instruction")
        if not isinstance(instruction, str):
            raise ValueError(f"{path}: row {number} has no string 'instruction'")
        if instruction in read:
            raise ValueError(f"{path}: row {number} repeats the instruction of row {read[instruction] + 1} "
                             f"({instruction[:60]!r}); AlpacaEval pairs answers by instruction")
        read[instruction] = number - 1
    return read


def match_outputs(model_rows: List[dict], model_path: str, reference_rows: List[dict], reference_path: str,
                  allow_partial: bool) -> Tuple[List[dict], List[dict]]:
    """(reference rows, model rows) paired in the reference's order; refused when an answer's
    instruction is not in the reference, or when only part of the reference is answered and
    ``allow_partial`` is off."""
    model = _instructions(model_rows, model_path)
    reference = _instructions(reference_rows, reference_path)
    for instruction, index in model.items():
        if instruction not in reference:
            raise ValueError(f"{model_path}: row {index + 1}'s instruction is not in the reference outputs "
                             f"{reference_path} ({instruction[:60]!r})")
    if len(model) < len(reference) and not allow_partial:
        missing = next(i for i in reference if i not in model)
        raise ValueError(f"{model_path} answers {len(model)} of the {len(reference)} reference instructions "
                         f"(first unanswered: {missing[:60]!r}); pass --allow-partial to judge only those")
    order = [i for i in reference if i in model]
    return [reference_rows[reference[i]] for i in order], [model_rows[model[i]] for i in order]


def _number(value) -> Optional[float]:
    value = float(value)
    return None if math.isnan(value) else value


def length_controlled(annotations, instructions: int) -> Tuple[Optional[float], Optional[float], Optional[str]]:
    """(LC win rate, its standard error, why not): alpaca-eval's GLM, only over all 805 instructions."""
    if instructions != ALPACAEVAL_INSTRUCTIONS:
        return None, None, (f"needs all {ALPACAEVAL_INSTRUCTIONS} AlpacaEval instructions (its GLM uses each "
                            f"one's difficulty), {instructions} judged")
    from alpaca_eval import metrics

    try:
        result = metrics.get_length_controlled_winrate(annotations, save_weights_dir=None)
    except Exception as error:  # its GLM data comes from the hub: offline ends here
        return None, None, f"alpaca-eval's GLM failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return _number(result["length_controlled_winrate"]), _number(result["lc_standard_error"]), None


def evaluate_outputs(config: AlpacaEvalConfig, log=print) -> dict:
    """Judge ``config.model_outputs``; writes the results JSON and the annotations; returns the results."""
    import pandas as pd

    model_rows = read_records(config.model_outputs, "output")
    name, path = resolve_annotator(config.annotator)
    check_api_keys(name, _annotator_configs(name, path))
    cache = config.annotations_cache or os.path.join(os.path.dirname(os.path.abspath(config.output)),
                                                     "alpaca_eval_cache", f"{name}.json")
    annotator = load_annotator(name, path, cache if os.path.exists(cache) else None)
    reference_path = config.reference_outputs or default_reference_path()
    reference_rows = read_records(reference_path, "output")
    reference, model = match_outputs(model_rows, config.model_outputs, reference_rows, reference_path,
                                     config.allow_partial)

    generator = model[0].get("generator") or Path(config.model_outputs).stem
    model_frame = pd.DataFrame([{**row, "generator": row.get("generator") or generator} for row in model])
    reference_frame = pd.DataFrame([{**row, "generator": row.get("generator") or "reference"} for row in reference])
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    annotator.caching_path = Path(cache)  # from here on alpaca-eval saves each judged chunk there
    log(f"judging {len(model)} answers of {generator} against {reference_frame['generator'].iloc[0]} with {name}")
    annotated = annotator.annotate_head2head(outputs_1=reference_frame, outputs_2=model_frame)
    annotations = pd.DataFrame(annotated)

    from alpaca_eval import metrics
    from alpaca_eval.utils import validate_alpacaeval_preference

    valid = annotations["preference"].astype(float).apply(validate_alpacaeval_preference, is_allow_nan=False)
    rates = metrics.get_winrate(annotations)
    lc, lc_error, lc_note = length_controlled(annotations, len(model))
    results = {
        "evaluation": "alpacaeval",
        "generator": generator,
        "model_outputs": config.model_outputs,
        "reference_outputs": config.reference_outputs or DEFAULT_REFERENCE,
        "reference_generator": str(reference_frame["generator"].iloc[0]),
        "annotator": name,
        "annotator_config": str(path),
        "instructions": len(model),
        "reference_instructions": len(reference_rows),
        "win_rate": _number(rates["win_rate"]),
        "standard_error": _number(rates["standard_error"]),
        "discrete_win_rate": _number(rates["discrete_win_rate"]),
        "n_wins": int(rates["n_wins"]), "n_wins_base": int(rates["n_wins_base"]), "n_draws": int(rates["n_draws"]),
        "n_total": int(rates["n_total"]),
        # Judgements alpaca-eval could not parse into a preference: left out of the win rate by it.
        "unparsed": int((~valid).sum()),
        "length_controlled_win_rate": lc,
        "lc_standard_error": lc_error,
        "length_controlled_note": lc_note,
        # Mean characters per answer (alpaca-eval's leaderboard rounds this down to an integer).
        "avg_length": float(model_frame["output"].str.len().mean()),
        "annotations": annotations_path(config.output),
        "annotations_cache": cache,
        "alpaca_eval_version": alpaca_eval().__version__,
    }
    # pandas' JSON: NaN as null, numpy numbers as plain ones (alpaca-eval writes its own files so).
    write_records(json.loads(annotations.to_json(orient="records")), results["annotations"])
    write_json(results, config.output)
    return results
