"""The run configs in examples/configs/: each data set's recipe with each layout preset parses
into a valid fine-tune configuration, every value has its flag's type, and the data sets carry
the noise alpha that docs/method.md's table states (the paper's Table 4)."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from symnoise_megatron.training.arguments import SECTIONS, parse_config

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "examples" / "configs"
DATASETS = sorted(CONFIGS.glob("*.yaml"))
LAYOUTS = sorted((CONFIGS / "layouts").glob("*.yaml"))


def documented_alphas():
    """{run config name: alpha} from docs/method.md's table (the paper's Table 4)."""
    table = (ROOT / "docs" / "method.md").read_text()
    return {name: int(alpha) for name, alpha in re.findall(r"^\|[^|]+\| `(\w+)\.yaml` \| (\d+) \|", table, re.M)}


def test_the_four_data_sets_and_the_layout_presets_are_there():
    assert sorted(p.stem for p in DATASETS) == ["alpaca", "evol_instruct", "open_platypus", "sharegpt"]
    assert {"cpu", "llama2-7b", "llama2-70b-fp8-64gpu", "llama2-70b-fp8-128gpu"} <= {p.stem for p in LAYOUTS}


@pytest.fixture
def data_and_save(tmp_path):
    (tmp_path / "data_tokens.bin").write_bytes(b"")  # validate() checks that the prefix exists
    return ["--data-path", str(tmp_path / "data"), "--save", str(tmp_path / "run")]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda p: p.stem)
@pytest.mark.parametrize("dataset", DATASETS, ids=lambda p: p.stem)
def test_a_data_set_then_a_layout_is_a_valid_configuration(dataset, layout, data_and_save):
    config = parse_config(data_and_save + ["--config", str(dataset), str(layout)])
    config.validate()
    recipe, preset = yaml.safe_load(dataset.read_text()), yaml.safe_load(layout.read_text())
    flags = config.flags()
    for key, value in {**recipe, **preset}.items():  # the layout, named later, wins
        assert flags[key] == value, key
    assert config.noise.noise_alpha == documented_alphas()[dataset.stem]


@pytest.mark.parametrize("path", DATASETS + LAYOUTS, ids=lambda p: p.stem)
def test_every_value_has_its_flags_type(path):
    # YAML reads 5e-5 (no decimal point) as a string and 5 as an int: the command line would
    # give floats, so a file must too.
    types = {f.name: f.type for section in SECTIONS.values() for f in dataclasses.fields(section)}
    for key, value in yaml.safe_load(path.read_text()).items():
        kind = types[key]
        if value is None:
            assert kind.startswith("Optional"), key
        else:
            expected = next(t for name, t in (("bool", bool), ("float", float), ("int", int), ("str", str)) if name in kind)
            assert type(value) is expected, (key, value, kind)


def test_the_alphas_are_the_ones_the_docs_state():
    stated = documented_alphas()
    assert sorted(stated) == sorted(p.stem for p in DATASETS)
    for path in DATASETS:
        assert yaml.safe_load(path.read_text())["noise_alpha"] == stated[path.stem], path.name
