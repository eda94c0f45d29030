"""nanoabsorber.config: flags built from dataclasses, validation, one-line errors."""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import pytest
from hypothesis import given, strategies as st

from nanoabsorber.absorber import AbsorbConfig
from nanoabsorber.config import (Parser, add_flags, build, comma_list, from_dict, in_range, non_negative, positive,
                                 setting, validate)
from nanoabsorber.errors import ConfigError
from nanoabsorber.lora import LoRAConfig


@dataclass
class Inner:
    rank: int = setting(4, "rank", check=positive)


@dataclass
class Outer:
    steps: int = setting(3, "steps", check=non_negative)
    lr: Optional[float] = setting(None, "learning rate (automatic)", check=positive)
    mode: str = setting("a", "mode", choices=("a", "b"))
    fast: bool = setting(False, "go fast")
    inner: Inner = setting(default_factory=Inner, help="inner", prefix="in-")
    hidden: int = dataclasses.field(default=7)          # no help: not a flag

    def __post_init__(self):
        validate(self)
        if self.fast and self.steps == 0:
            raise ConfigError("fast", "needs steps > 0")


def parser():
    p = Parser(prog="t")
    add_flags(p, Outer)
    return p


def test_flags_defaults_and_nested_prefix():
    p = parser()
    cfg = build(p, Outer, p.parse_args([]))
    assert cfg == Outer()
    cfg = build(p, Outer, p.parse_args(["--steps", "5", "--lr", "0.5", "--mode", "b", "--fast", "--in-rank", "2"]))
    assert cfg == Outer(steps=5, lr=0.5, mode="b", fast=True, inner=Inner(rank=2))
    assert "--hidden" not in p.format_help() and "(default: 3)" in p.format_help()


@pytest.mark.parametrize("argv,needle", [(["--steps", "-1"], "--steps: must be >= 0"),
                                         (["--steps", "x"], "--steps: invalid int value"),
                                         (["--mode", "c"], "--mode: must be one of a, b"),
                                         (["--in-rank", "0"], "--in-rank: must be > 0"),
                                         (["--fast", "--steps", "0"], "--fast: needs steps > 0"),
                                         (["--fast=yes"], "--fast")])
def test_bad_values_are_one_line_exit_2(capsys, argv, needle):
    p = parser()
    with pytest.raises(SystemExit) as e:
        build(p, Outer, p.parse_args(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_python_api_validates_the_same_way():
    with pytest.raises(ConfigError, match="steps: must be >= 0"):
        AbsorbConfig(steps=-3)
    with pytest.raises(ConfigError, match="chunk: must be > 0"):
        AbsorbConfig(chunk=0)
    with pytest.raises(ConfigError, match="rank: must be > 0"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="targets: unknown 'qkv_fused'"):
        LoRAConfig(targets="qkv_fused")
    with pytest.raises(ConfigError, match="probes"):
        AbsorbConfig(probes="recite,summary")


@given(st.integers(-5, 5), st.floats(-1, 2, allow_nan=False))
def test_checks_accept_exactly_their_range(v, x):
    assert (positive(v) is None) == (v > 0)
    assert (non_negative(v) is None) == (v >= 0)
    assert (in_range(0.0, 1.0)(x) is None) == (0.0 <= x <= 1.0)


def test_comma_list():
    check = comma_list(("q", "k"), extra=("all",), empty_ok=False)
    assert check("q,k") is None and check("all") is None and check(" q ") is None
    assert "unknown 'z'" in check("q,z") and check("") == "must not be empty"


@given(st.integers(0, 500), st.sampled_from(["l1", "mse", "kl"]), st.integers(1, 64), st.sampled_from(["", "recite"]))
def test_asdict_from_dict_round_trip(steps, loss, rank, probes):
    cfg = AbsorbConfig(steps=steps, loss=loss, probes=probes, lora=LoRAConfig(rank=rank))
    assert from_dict(AbsorbConfig, dataclasses.asdict(cfg)) == cfg


def test_from_dict_refuses_unknown_settings():
    with pytest.raises(ConfigError, match="nonsense"):
        from_dict(AbsorbConfig, {"nonsense": 1})


def test_folder_or_new(tmp_path):
    from nanoabsorber.config import folder_or_new

    (tmp_path / "f").write_text("x")
    assert folder_or_new(str(tmp_path)) is None and folder_or_new(str(tmp_path / "new" / "deeper")) is None
    assert folder_or_new(str(tmp_path / "f")) == "exists and is not a folder"
    assert "is a file" in folder_or_new(str(tmp_path / "f" / "sub")) and folder_or_new(" ") == "must not be empty"


@dataclass
class WithList:
    files: list[str] = setting(default_factory=list, help="input files", check=lambda v: None if v.endswith(".txt")
                               else f"must end in .txt, not {v!r}")
    sizes: list[int] = setting(default_factory=lambda: [8], help="sizes", check=positive)

    def __post_init__(self):
        validate(self)


def test_list_valued_settings_are_repeatable_flags(capsys):
    p = Parser(prog="t")
    add_flags(p, WithList)
    assert build(p, WithList, p.parse_args([])) == WithList() == WithList(files=[], sizes=[8])   # defaults kept
    cfg = build(p, WithList, p.parse_args(["--files", "a.txt", "--sizes", "3", "--files", "b.txt"]))
    assert cfg == WithList(files=["a.txt", "b.txt"], sizes=[3])
    assert "(repeatable)" in p.format_help()
    a, b = build(p, WithList, p.parse_args([])), build(p, WithList, p.parse_args([]))
    a.files.append("x.txt")
    assert b.files == []                                        # no shared default list
    for argv, needle in ((["--files", "a.txt", "--files", "b.csv"], "--files: must end in .txt, not 'b.csv'"),
                         (["--sizes", "0"], "--sizes: must be > 0"), (["--sizes", "x"], "invalid int value")):
        with pytest.raises(SystemExit) as e:
            build(p, WithList, p.parse_args(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ConfigError, match="sizes: must be > 0"):     # the Python API checks every item
        WithList(sizes=[2, -1])
    assert from_dict(WithList, dataclasses.asdict(cfg)) == cfg
