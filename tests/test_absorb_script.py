"""absorb.py: bad input gives one line and exit 2, before the model loads, and leaves no output."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"   \n\n", "is empty"),
                                            (b"\x00\x01\x02binary", "binary"), (b"\xff\xfe\xfa", "not UTF-8")])
def test_absorb_cli_rejects_bad_context(tmp_path, content, match):
    f = tmp_path / "ctx.txt"
    f.write_bytes(content)
    out = tmp_path / "a.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "absorb.py"), "--context", str(f), "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(f) in err[0] and match in err[0] and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_absorb_cli_rejects_unknown_probe_kind(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "absorb.py"), "--probes", "recite,summary"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "unknown probe kind" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--probes" in r.stderr
