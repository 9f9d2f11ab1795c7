"""Import alpaca-eval 0.6.6 on this stack (setuptools >= 81, transformers 5, pandas 3), with the shims it needs.

alpaca-eval 0.6.6 (its last release) was written for older neighbours:

- ``alpaca_eval/utils.py`` imports ``pkg_resources`` for two calls (``parse_version`` and
  ``get_distribution(...).version``); setuptools 81 and later no longer ship that module, and
  torch 2.13 requires setuptools >= 77, so pinning an old setuptools is not an option that
  stays true. Where ``pkg_resources`` is missing, a module with exactly those two functions
  (from ``packaging`` and ``importlib.metadata``) stands in for it.
- Its local decoder, ``huggingface_local_completions``, passes ``load_in_8bit=False`` and
  ``torch_dtype=None`` to ``from_pretrained`` when there is no GPU; transformers 5 refuses
  ``load_in_8bit`` (quantisation moved to ``quantization_config``) and renamed ``torch_dtype``
  to ``dtype``. The decoder's loaders are wrapped so that those two no-op values are dropped
  and a real dtype is passed on under its new name; everything else reaches transformers as
  alpaca-eval wrote it.
- Its annotation cache is read back with ``pandas.read_json``, which types a column of
  preferences 1 and 2 as integers; alpaca-eval then writes 1.5 (a draw) into that column, which
  pandas 3 refuses instead of silently upcasting, so the second run over a cache fails. The
  pairwise annotator's cache loader casts the preferences back to alpaca-eval's declared
  annotation type (float) after reading.

All are applied by ``alpaca_eval()``, the only way the package imports alpaca-eval, once each.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types

from symnoise_megatron.common.extras import install_command, require


def _pkg_resources_stand_in() -> types.ModuleType:
    from packaging.version import parse

    module = types.ModuleType("pkg_resources")
    module.__doc__ = "symnoise_megatron's stand-in: parse_version and get_distribution, for alpaca-eval 0.6.6"
    module.parse_version = parse
    module.get_distribution = lambda name: types.SimpleNamespace(version=importlib.metadata.version(name))
    return module


class _Transformers5Loader:
    """``from_pretrained`` of a transformers Auto class without the arguments transformers 5 refuses."""

    def __init__(self, auto_class):
        self.auto_class = auto_class

    def from_pretrained(self, name, *args, **kwargs):
        if not kwargs.get("load_in_8bit"):
            kwargs.pop("load_in_8bit", None)
        if "torch_dtype" in kwargs:
            dtype = kwargs.pop("torch_dtype")
            if dtype is not None:
                kwargs["dtype"] = dtype
        return self.auto_class.from_pretrained(name, *args, **kwargs)


def _shim_local_decoder() -> None:
    local = importlib.import_module("alpaca_eval.decoders.huggingface_local")
    for name in ("AutoModelForCausalLM", "AutoTokenizer"):
        loader = getattr(local, name)
        if not isinstance(loader, _Transformers5Loader):
            setattr(local, name, _Transformers5Loader(loader))


def _shim_cache_loader() -> None:
    from alpaca_eval.annotators.pairwise_evaluator import PairwiseAnnotator

    load = PairwiseAnnotator.load_
    if getattr(load, "_symnoise_shim", False):
        return

    def load_(self, path=None):
        load(self, path)
        frame = self.df_annotations
        if frame is not None and self.annotation_key in frame and self.annotation_type is float:
            frame[self.annotation_key] = frame[self.annotation_key].astype(float)

    load_._symnoise_shim = True
    PairwiseAnnotator.load_ = load_


def alpaca_eval() -> types.ModuleType:
    """The ``alpaca_eval`` package, shims applied; a missing install is one line naming the extra."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        sys.modules["pkg_resources"] = _pkg_resources_stand_in()
    require("alpaca_eval", "symnoise-evaluate alpacaeval")
    try:
        module = importlib.import_module("alpaca_eval")
        importlib.import_module("alpaca_eval.main")
    except ImportError as error:  # installed, but one of its own imports fails
        raise ValueError(f"alpaca-eval cannot be imported ({error}); {install_command('eval')} installs what it needs") from None
    _shim_cache_loader()
    try:
        _shim_local_decoder()
    except ImportError:  # its optional dependencies (peft): local_decoder_ready() names them when needed
        pass
    return module


def local_decoder_ready() -> None:
    """Raise one line when alpaca-eval's local decoder cannot be imported (peft and friends)."""
    alpaca_eval()
    try:
        _shim_local_decoder()
    except ImportError as error:
        raise ValueError(f"alpaca-eval's huggingface_local_completions cannot load: {error} "
                         f"({install_command('eval')} installs peft, which it imports)") from None
