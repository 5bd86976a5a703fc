"""bench/gpu_check.sh --dry-run: the GPU check's CPU rehearsal prints its one table, with every
section present (measured, or "not measured: <why>"), in under five minutes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["mimi encode", "pyannote segmentation", "pyannote embedding", "resemblyzer embedding", "trainer step"]
TRAINER_SETTINGS = ["eager", "act. ckpt", "compile,", "compile + act. ckpt"]


@pytest.mark.slow
def test_gpu_check_dry_run_prints_every_section():
    env = {**os.environ, "PYTHON": sys.executable}
    t = time.time()
    proc = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=330)
    wall = time.time() - t
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## GPU check, DRY RUN" in out, out
    table = out.split("\n\n", 1)[1].splitlines()
    assert table[0].split()[:2] == ["section", "setting"] and set(table[1]) <= {"-", " "}
    rows = table[2:]
    for section in SECTIONS:
        mine = [r for r in rows if r.startswith(section)]
        assert mine, f"no row for {section}:\n{out}"
        for r in mine:  # a figure, or the stated reason it is missing
            assert ("x real time" in r or "/s" in r) or "not measured: " in r, r
    trainer = [r for r in rows if r.startswith("trainer step")]
    for setting in TRAINER_SETTINGS:
        assert any(setting in r for r in trainer), f"no trainer row for {setting}:\n{out}"
    assert any("RANDOM-INIT" in r or "released weights" in r for r in rows if r.startswith("mimi"))
    assert wall < 300, f"dry run took {wall:.0f} s"
