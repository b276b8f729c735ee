"""The CLI entry point: version, presets listing, and user errors as one line with their exit code."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from infinitrain import __version__
from infinitrain.cli import cli

ENTRY = [sys.executable, "-c", "from infinitrain.cli import main; main()"]


def test_presets_lists_every_preset_with_its_size():
    result = CliRunner().invoke(cli, ["presets"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert set(lines) == {"debug", "1b", "1b-mod", "8b", "8b-mod", "megalodon-debug", "megalodon-7b"}
    assert "8.030 B" in lines["8b"] and "1.236 B" in lines["1b"]
    from infinitrain.model import PRESETS, count_parameters

    n = count_parameters(PRESETS["debug"])
    assert 1e3 < n < 1e6 and f"{n / 1e3:.3f} K" in lines["debug"]  # was "0.000 B"
    assert "7.388 B" in lines["megalodon-7b"] and "arch=megalodon" in lines["megalodon-7b"]


def test_version_and_help_as_a_subprocess():
    out = subprocess.run(ENTRY + ["--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
    out = subprocess.run(ENTRY + ["--help"], capture_output=True, text=True, check=True)
    assert "presets" in out.stdout


def test_unknown_command_is_a_usage_error_without_traceback():
    out = subprocess.run(ENTRY + ["trian"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "No such command" in out.stderr


def test_an_override_typed_as_an_option_gets_a_hint():
    out = subprocess.run(ENTRY + ["train", "--recipe", "debug", "--schedule.steps=30"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "No such option '--schedule.steps': an override has no dashes, write schedule.steps=30" in out.stderr


def test_deepspeed_launcher_local_rank_is_accepted_before_the_command():
    out = subprocess.run(ENTRY + ["--local_rank=1", "presets"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "debug"


def test_help_does_not_import_torch():
    """Registering every command stays cheap: `infinitrain --help` must not pull torch or DeepSpeed in."""
    code = "import sys; from infinitrain.cli import cli; print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]



def _commands(group, path=()):
    """(path, command) for every command of the CLI tree, groups included."""
    import click

    for name, cmd in group.commands.items():
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))


def test_help_listings_are_not_truncated_and_every_option_says_what_it_does():
    import click

    from infinitrain.cli_help import first_sentence

    undocumented = []
    for path, cmd in _commands(cli):
        if isinstance(cmd, click.Group):
            listing = CliRunner().invoke(cli, [*path, "--help"]).output
            commands = " ".join(listing.split("Commands:")[1].split())
            for sub in cmd.commands.values():  # the whole sentence, where Click cut it at ~45 characters with "..."
                assert f"{sub.name} {' '.join(first_sentence(sub).split())}" in commands, (path, sub.name, commands)
        undocumented += [f"{' '.join(path)} {p.opts[0]}" for p in cmd.params
                         if isinstance(p, click.Option) and not p.hidden and not p.help]
    assert not undocumented, undocumented
