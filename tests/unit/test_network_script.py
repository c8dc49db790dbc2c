"""``links._script``: the commands that build a VM's network run from one shell script per
side, each command fed its batch or table as its standard input."""

from __future__ import annotations

import subprocess

import pytest

from tenkibox.host.network import links


def test_each_command_reads_its_own_lines_in_order() -> None:
    script = links._script([("cat", ["a", "b"]), ("tr a-z A-Z", ["c"]), ("cat", ["$HOME `x`"])])
    done = subprocess.run(["sh", "-es"], input=script, capture_output=True, text=True,
                          check=True)
    # quoted end marker: nothing in a batch or a table is expanded by the shell
    assert done.stdout == "a\nb\nC\n$HOME `x`\n"


def test_a_failing_command_stops_the_script() -> None:
    script = links._script([("false", []), ("echo", ["never"])]) + "echo after\n"
    done = subprocess.run(["sh", "-es"], input=script, capture_output=True, text=True)
    assert done.returncode != 0 and "after" not in done.stdout


def test_input_holding_the_end_marker_is_refused() -> None:
    with pytest.raises(links.NetworkError, match="TENKI_INPUT_END"):
        links._script([("nft -f -", ["table ip x {", f"  {links._END}  ", "}"])])
