"""nanoabsorber.cost: peak-memory measurement, the environment record, and the measurement
processes (the installed package, no PYTHONPATH)."""
import pytest
import torch

from nanoabsorber import cost


def test_peak_memory_sees_an_allocation():
    with cost.PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2 ** 20 // 4)             # 64 MiB, touched
        x += 1
    del x
    if mem.hwm_reset:
        assert mem.extra >= 48 * 2 ** 20
    assert mem.peak >= mem.start > 0
    d = mem.as_dict()
    assert d["memory_extra_bytes"] == mem.extra and d["memory_kind"].startswith("RSS high-water")


def test_rss_helpers_are_plausible():
    assert cost.rss_bytes() > 10 * 2 ** 20                       # a process with torch loaded
    assert cost.peak_rss_bytes() >= cost.rss_bytes() // 2


def test_environment_records_the_torch_threads_in_use():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        env = cost.environment("cpu")
    finally:
        torch.set_num_threads(saved)
    assert env["torch_threads"] == 1 and env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["git_commit"] is None or len(env["git_commit"]) == 40


def test_run_isolated_uses_the_installed_package_and_reports_failures(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)                                  # not the source tree
    with pytest.raises(RuntimeError, match=r"measurement process \(nonsense\) failed: KeyError: 'nonsense'"):
        cost.run_isolated({"kind": "nonsense"}, timeout=120)
