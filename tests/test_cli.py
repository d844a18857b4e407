"""The moe-ext command line."""
import json
import subprocess
import sys

from moe_ext import cli


def test_info_json_lists_cpu_kernels(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["cpu_kernels"]) >= {"route", "align", "lora_forward", "lora_backward"}
    assert info["torch"].startswith("2.")
    assert isinstance(info["built_with_cuda"], bool)


def test_info_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "moe_ext.cli", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "cpu_kernels" in out and "lora_forward" in out


def test_unknown_command_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "moe_ext.cli", "nope"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
