"""Every flag of every script, given an invalid value, ends in one line on stderr and exit status
2: no traceback, and before any model is loaded (a model load here fails the test)."""
import argparse
import importlib.util

import pytest

import nanoabsorber
import nanoabsorber.checkpoint
from nanoabsorber.cli import run
from tests.conftest import ROOT

# flags whose every value is valid (free text): nothing to reject
FREE_TEXT = {("sample.py", "--prompt"), ("sample.py", "--system"), ("chat.py", "--system")}
# flags whose generic bad value would be valid: a value that is not
OVERRIDES = {("absorb.py", "--out"): "adapter.txt"}


class ReachedModelLoad(BaseException):
    """Raised instead of loading a model: a bad value got past validation."""


def _boom(*a, **kw):
    raise ReachedModelLoad


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name[:-3]}", ROOT / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def base_args(script: str, tmp) -> list[str]:
    """Valid values for a script's required flags."""
    if script == "train.py":
        data = tmp / "data.txt"
        data.write_text("the cat sat on the mat\n" * 50)
        return ["--data", str(data), "--out", str(tmp / "run")]
    return []


def bad_values(script: str, action: argparse.Action, tmp) -> list[str]:
    flag = action.option_strings[0]
    if (script, flag) in OVERRIDES:
        return [flag, OVERRIDES[script, flag]]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [f"{flag}=maybe"]                                     # a switch takes no value
    kind = getattr(action.type, "__name__", "str")
    if kind in ("int", "float"):
        return [flag, "not-a-number"]
    if action.nargs == 0:                                            # store_true
        return [f"{flag}=maybe"]
    # a path under a plain file: no such input, no place for an output, no valid list or choice
    (tmp / "a_file").write_text("x")
    return [flag, str(tmp / "a_file" / "@bogus@")]


SCRIPTS = ["absorb.py", "sample.py", "eval.py", "train.py", "chat.py"]


def flags_of(script: str):
    p = load_script(script).build_parser()
    return [(script, a.option_strings[0]) for a in p._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


ALL_FLAGS = [c for s in SCRIPTS for c in flags_of(s)]
CASES = [c for c in ALL_FLAGS if c not in FREE_TEXT]


@pytest.mark.parametrize("script,flag", CASES, ids=[f"{s}:{f}" for s, f in CASES])
def test_every_flag_rejects_an_invalid_value(script, flag, tmp_path, capsys, monkeypatch):
    mod = load_script(script)
    for target in (mod, nanoabsorber, nanoabsorber.checkpoint):
        for name in ("load", "load_model"):
            if hasattr(target, name):
                monkeypatch.setattr(target, name, _boom)
    action = next(a for a in mod.build_parser()._actions if flag in a.option_strings)
    argv = base_args(script, tmp_path) + bad_values(script, action, tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run(lambda: mod.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, (argv, err)
    assert len(err) == 1 and "Traceback" not in err[0], (argv, err)


def test_free_text_flags_exist():
    """FREE_TEXT names real flags (a renamed flag must not silently drop out of the walk)."""
    assert FREE_TEXT <= set(ALL_FLAGS)
