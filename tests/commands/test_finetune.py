"""symnoise-finetune's command: what it prints, and where."""


def test_the_fine_tune_logs_once_per_job_also_before_the_process_group_exists(monkeypatch, capsys):
    """The data's split is logged before the ranks join their group: each of torchrun's workers
    printed it until they did."""
    from symnoise_megatron.commands.finetune import rank0_print

    for rank, printed in (("1", ""), ("0", "split\n")):
        monkeypatch.setenv("RANK", rank)
        rank0_print("split")
        assert capsys.readouterr().out == printed
    monkeypatch.delenv("RANK")
    rank0_print("alone")
    assert capsys.readouterr().out == "alone\n"
