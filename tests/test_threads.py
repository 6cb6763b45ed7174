"""qlora/threads.py: `import qlora` makes the OpenMP runtime torch loads wait passively, what libgomp itself reports."""
import os
import re
import subprocess
import sys

import pytest


def libgomp_spin_count(**env: str) -> int:
    """GOMP_SPINCOUNT as the libgomp of a fresh `import qlora` process read it (OMP_DISPLAY_ENV)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "QLORA_OMP_PASSIVE")}
    out = subprocess.run([sys.executable, "-c", "import qlora"], capture_output=True, text=True, check=True,
                         env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", out.stderr)
    if found is None:
        pytest.skip("torch's OpenMP runtime is not libgomp")
    return int(found.group(1))


def test_import_qlora_makes_openmp_workers_sleep():
    assert libgomp_spin_count() == 0  # passive: no spinning after a parallel region
    assert libgomp_spin_count(QLORA_OMP_PASSIVE="0") == 300_000  # libgomp's own default


def test_a_users_choice_is_kept():
    assert libgomp_spin_count(OMP_WAIT_POLICY="ACTIVE") > 300_000
    assert libgomp_spin_count(GOMP_SPINCOUNT="1000") == 1000


def test_too_late_once_torch_is_imported(monkeypatch):
    from qlora.threads import prefer_passive_openmp

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("QLORA_OMP_PASSIVE", raising=False)
    import torch  # noqa: F401  (the suite has it loaded anyway)

    assert prefer_passive_openmp() is False and "OMP_WAIT_POLICY" not in os.environ
