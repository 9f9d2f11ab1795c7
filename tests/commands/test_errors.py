"""Every command's ending: Ctrl-C is one line and exit code 130, after the command's own cleanup."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

from symnoise_megatron.data import BUNDLED_TOKENIZER

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ctrl_c_during_preprocessing_is_one_line_130_and_leaves_nothing(tmp_path):
    rows = tmp_path / "many.jsonl"
    row = json.dumps({"instruction": "Name a colour of the sky at noon.", "input": "", "output": "Blue, mostly."})
    rows.write_text((row + "\n") * 400_000)
    prefix = tmp_path / "out" / "many"
    command = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(rows),
               "--tokenizer-model", BUNDLED_TOKENIZER, "--output-prefix", str(prefix), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not glob.glob(f"{prefix}*.tmp-*") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted: give it more rows"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert err.endswith("interrupted\n") and "Traceback" not in err, err[-2000:]
    assert not glob.glob(f"{prefix}*")  # no temporary and no half-written output


def test_an_error_is_one_line_and_a_rank_other_than_0_names_itself(monkeypatch, capsys):
    from symnoise_megatron.commands.errors import exits_on_user_error

    @exits_on_user_error
    def main(argv=None):
        raise FileNotFoundError("/data/node2/alpaca_tokens.idx does not exist")

    monkeypatch.setenv("RANK", "0")
    assert main() == 2 and capsys.readouterr().err == "error: /data/node2/alpaca_tokens.idx does not exist\n"
    monkeypatch.setenv("RANK", "9")
    assert main() == 2 and capsys.readouterr().err == "[rank 9] error: /data/node2/alpaca_tokens.idx does not exist\n"
