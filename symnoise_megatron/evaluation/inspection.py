"""What a path holds, for a person or a script (symnoise-inspect): a training or converted
checkpoint folder or one of its iterations, a preprocessed prefix, a Hugging Face directory
exported by symnoise-convert, or a generated outputs file with its ``.meta``.

``inspect_path`` returns a JSON-ready report (``kind``, ``path`` and what that kind records,
the provenance record included); ``render`` turns it into a short block of text. A path that is
none of these, or a file among them that is truncated or foreign, is a ValueError or
FileNotFoundError of one line.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

from symnoise_megatron.checkpoint import paths, provenance
from symnoise_megatron.common.files import read_json
from symnoise_megatron.data.identity import prefix_identity, read_meta
from symnoise_megatron.data.preprocess import output_paths
from symnoise_megatron.evaluation.records import meta_path, read_records

EXPECTED = ("expected a training or converted checkpoint folder (holding latest_checkpointed_iteration.txt), one of its "
            "iter_* or release folders, a preprocessed prefix (PREFIX_meta.json beside it), a Hugging Face directory "
            "written by symnoise-convert megatron-to-hf, or a generated outputs file with its .meta")
_PREFIX_FILES = ("_meta.json", "_tokens.bin", "_tokens.idx", "_loss_mask.bin", "_loss_mask.idx")


def inspect_path(path: str) -> dict:
    path = os.path.normpath(path)
    if os.path.isdir(path):
        if paths.has_checkpoint(path):
            return _checkpoint_folder(path)
        if _is_iteration_folder(path):
            return _iteration_folder(path)
        if os.path.exists(os.path.join(path, "config.json")):
            return _hf_directory(path)
        raise ValueError(f"{path} is a folder with none of these files; {EXPECTED}")
    prefix = _prefix_of(path)
    if prefix is not None:
        return _prefix(prefix)
    if os.path.isfile(path):
        outputs = path[: -len(".meta")] if path.endswith(".meta") else path
        if os.path.exists(meta_path(outputs)) and os.path.exists(outputs):
            return _outputs(outputs)
        if os.path.basename(path) == provenance.FILE:
            record = provenance.read(path)
            return {"kind": f"{record['kind']} provenance record", "path": path, "provenance": record}
        raise ValueError(f"{path} is none of these (a file without {os.path.basename(meta_path(outputs))} beside it); "
                         f"{EXPECTED}")
    raise FileNotFoundError(f"{path} does not exist; {EXPECTED}")


def _is_iteration_folder(path: str) -> bool:
    name = os.path.basename(path)
    return (paths.iteration_of(name) is not None or name == paths.RELEASE) and (
        os.path.exists(os.path.join(path, provenance.FILE)) or os.path.exists(os.path.join(os.path.dirname(path), paths.INFO)))


def _prefix_of(path: str) -> Optional[str]:
    """The prefix that ``path`` names, itself or as one of its files, when its meta file exists."""
    candidates = [path] + [path[: -len(suffix)] for suffix in _PREFIX_FILES if path.endswith(suffix)]
    for prefix in candidates:
        if os.path.exists(output_paths(prefix)["meta"]):
            return prefix
    return None


def _info(root: str) -> dict:
    try:
        return paths.read_info(root)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as error:
        raise ValueError(f"{os.path.join(root, paths.INFO)}: not valid JSON ({error.msg} at line {error.lineno}); "
                         "the file is truncated or damaged") from None


def _checkpoint_folder(root: str) -> dict:
    iteration = paths.read_tracker(root)
    info = _info(root)
    if iteration is None:
        return {"kind": "converted checkpoint", "path": root, "model": info.get("model"),
                "converted_from": info.get("converted_from"),
                "provenance": provenance.read_if_present(paths.iteration_dir(root, None))}
    iterations = sorted(n for n in map(paths.iteration_of, os.listdir(root)) if n is not None)
    return {"kind": "training checkpoint", "path": root, "latest_iteration": iteration, "iterations": iterations,
            "unfinished_saves": paths.unfinished_saves(root), "model": info.get("model"),
            "prompt_template": info.get("prompt_template"),
            "provenance": provenance.read_if_present(paths.iteration_dir(root, iteration))}


def _iteration_folder(path: str) -> dict:
    root, name = os.path.dirname(path), os.path.basename(path)
    record = provenance.read_if_present(path)
    if name == paths.RELEASE:
        return {"kind": "converted checkpoint", "path": path, "model": _info(root).get("model"),
                "converted_from": _info(root).get("converted_from"), "provenance": record}
    latest = paths.read_tracker(root) if paths.has_checkpoint(root) else None
    return {"kind": "training checkpoint iteration", "path": path, "iteration": paths.iteration_of(name),
            "latest_iteration": latest, "model": _info(root).get("model"), "provenance": record}


def _hf_directory(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    config = read_json(config_path)
    if not os.path.exists(os.path.join(path, provenance.FILE)):
        raise ValueError(f"{path} is a Hugging Face directory that symnoise-convert did not write (no {provenance.FILE}): "
                         f"nothing records what it was trained on; {EXPECTED}")
    keys = ("architectures", "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "torch_dtype")
    return {"kind": "Hugging Face directory", "path": path, "config": {k: config[k] for k in keys if k in config},
            "provenance": provenance.read(path)}


def _prefix(prefix: str) -> dict:
    meta = read_meta(prefix)
    keys = ("inputs", "formats", "turns", "seq_length", "rows_read", "samples", "tokens", "response_tokens",
            "truncated", "dropped", "skipped_rows", "length_histogram")
    return {"kind": "preprocessed prefix", "path": os.path.abspath(prefix),
            "meta": {k: meta[k] for k in keys if k in meta} | {"tokenizer_path": meta["tokenizer"].get("path")},
            "identity": prefix_identity(prefix, meta)}


def _model_record(model: Optional[str], iteration) -> Tuple[Optional[dict], str]:
    """The provenance of the weights an outputs file names, and a word on where it came from."""
    if not model or not os.path.isdir(model):
        return None, f"{model} no longer exists" if model else "not recorded"
    if paths.has_checkpoint(model):
        directory = paths.iteration_dir(model, None if iteration in (None, "release") else int(iteration))
        return provenance.read_if_present(directory), directory
    return (provenance.read(model), model) if os.path.exists(os.path.join(model, provenance.FILE)) else (None, model)


def _outputs(outputs: str) -> dict:
    path = meta_path(outputs)
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("generator"), dict):
        raise ValueError(f"{path}: not a generator record written by symnoise-generate (no 'generator' object)")
    answers = read_records(outputs, "output", allow_empty=True)
    generator = meta["generator"]
    record, where = _model_record(generator.get("model"), generator.get("checkpoint_iteration"))
    return {"kind": "generated outputs", "path": outputs, "answers": len(answers), "generator": generator,
            "engine": generator.get("engine", meta.get("engine")), "batch_size": meta.get("batch_size"), "model_provenance_from": where,
            "model_provenance": record}


# The human-readable block ------------------------------------------------------------------
def _rows(report: dict) -> List[Tuple[str, str]]:
    kind = report["kind"]
    if kind == "preprocessed prefix":
        meta, identity = report["meta"], report["identity"]
        tokenizer = identity["tokenizer"]
        return [
            ("samples", f"{meta.get('samples')} of {meta.get('rows_read')} rows ({meta.get('tokens')} tokens, "
                        f"{meta.get('response_tokens')} in responses); {meta.get('truncated')} truncated, "
                        f"dropped {meta.get('dropped') or 'none'}, skipped rows {meta.get('skipped_rows') or 'none'}"),
            ("inputs", ", ".join(f"{p} ({(meta.get('formats') or {}).get(p, '?')})" for p in meta.get("inputs", []))),
            ("template", f"{identity.get('prompt_template')} (turns: {meta.get('turns')}); samples up to "
                         f"{meta.get('seq_length')} tokens"),
            ("tokenizer", f"{tokenizer.get('kind')} {tokenizer.get('file')} (vocabulary {tokenizer.get('vocab_size')}, "
                          f"sha256 {str(tokenizer.get('sha256'))[:12]}) from {meta.get('tokenizer_path')}"),
            ("files", ", ".join(f"{name} {size} bytes" for name, size in identity["file_bytes"].items())),
            ("digest", identity["digest"]),
        ]
    rows: List[Tuple[str, str]] = []
    if kind == "generated outputs":
        generator = report["generator"]
        rows.append(("answers", f"{report['answers']} (engine {report.get('engine')}, batch size {report.get('batch_size')})"))
        iteration = generator.get("checkpoint_iteration")
        rows.append(("model", f"{generator.get('model')}" + ("" if iteration is None else f" at iteration {iteration}")))
        decoding = ", ".join(f"{k} {generator[k]}" for k in ("template", "decoding", "max_new_tokens", "repetition_penalty",
                                                              "temperature", "top_p", "seed") if k in generator)
        rows.append(("decoding", decoding))
        record = report.get("model_provenance")
        if record is None:
            rows.append(("provenance", f"unknown ({report.get('model_provenance_from')})"))
        else:
            rows += [(label, text) for label, text in provenance.describe(record) if label != "command"]
        return rows
    if kind == "Hugging Face directory":
        config = report["config"]
        rows.append(("config", ", ".join(f"{k} {v}" for k, v in config.items())))
    if kind == "training checkpoint":
        rows.append(("iterations", ", ".join(map(str, report["iterations"])) or "none finished"))
        if report.get("unfinished_saves"):
            rows.append(("unfinished", ", ".join(report["unfinished_saves"])))
    if kind == "converted checkpoint" and report.get("provenance") is None:
        rows.append(("converted", f"from {report.get('converted_from')}"))
    record = report.get("provenance")
    if record is None:
        rows.append(("provenance", "unknown: saved without a provenance record (an older symnoise-megatron)"))
        rows.append(("model", provenance.model_text(report.get("model"))))
    else:
        rows += provenance.describe(record)
    return rows


def _title(report: dict) -> str:
    kind = report["kind"]
    if kind == "training checkpoint":
        return f"{report['path']}: training checkpoint, latest iteration {report['latest_iteration']}"
    if kind == "training checkpoint iteration":
        return f"{report['path']}: iteration {report['iteration']} of a training run (latest: {report['latest_iteration']})"
    return f"{report['path']}: {kind}"


def render(report: dict) -> str:
    width = 12
    lines = [_title(report)]
    for label, text in _rows(report):
        lines.append(f"  {label:<{width}}{text}")
    return "\n".join(lines)
