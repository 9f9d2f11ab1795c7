"""tools/dev/mutants.py's smallest mode: every mutation still applies to the current source.

The full run (each mutation against its tests, minutes each) is for a person to start
(docs/development.md); this keeps the list from rotting when the code moves.
"""

import pytest

from tools.dev import mutants


def test_every_mutation_applies_once_and_compiles():
    mutated = mutants.check_snippets()
    assert len(mutated) == len(mutants.MUTATIONS) == len({m.name for m in mutants.MUTATIONS})
    for mutation, source in zip(mutants.MUTATIONS, mutated):
        assert mutation.replacement in source and mutation.snippet != mutation.replacement, mutation.name


def test_a_snippet_no_longer_in_the_source_is_an_error_naming_the_mutation(tmp_path, capsys):
    moved = mutants.Mutation("moved", "module.py", "x = 1", "x = 2", ("tests",), "a bug")
    (tmp_path / "module.py").write_text("y = 1\n")
    with pytest.raises(mutants.SnippetError, match=r"mutation moved: module.py contains the snippet 'x = 1' 0 times"):
        mutants.check_snippets([moved], root=str(tmp_path))
    (tmp_path / "module.py").write_text("x = 1\nx = 1\n")
    with pytest.raises(mutants.SnippetError, match="2 times"):
        mutants.check_snippets([moved], root=str(tmp_path))
    assert mutants.main(["--check"]) == 0
    assert f"{len(mutants.MUTATIONS)} mutations apply" in capsys.readouterr().out
