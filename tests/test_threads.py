"""qlora/threads.py: `import qlora` makes the OpenMP runtime torch loads wait passively, what libgomp itself reports."""
import os
import re
import subprocess
import sys

import pytest


def libgomp_spin_counts(*envs: dict[str, str]) -> list[int]:
    """GOMP_SPINCOUNT as the libgomp of a fresh `import qlora` process read it (OMP_DISPLAY_ENV),
    one process per environment in `envs`, run side by side."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "QLORA_OMP_PASSIVE")}
    procs = [subprocess.Popen([sys.executable, "-c", "import qlora"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env}) for env in envs]
    counts = []
    for proc in procs:
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-2000:]
        found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", err)
        if found is None:
            pytest.skip("torch's OpenMP runtime is not libgomp")
        counts.append(int(found.group(1)))
    return counts


def test_import_qlora_makes_openmp_workers_sleep():
    passive, opted_out = libgomp_spin_counts({}, {"QLORA_OMP_PASSIVE": "0"})
    assert passive == 0  # passive: no spinning after a parallel region
    assert opted_out == 300_000  # libgomp's own default


def test_a_users_choice_is_kept():
    active, set_count = libgomp_spin_counts({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"})
    assert active > 300_000
    assert set_count == 1000


def test_too_late_once_torch_is_imported(monkeypatch):
    from qlora.threads import prefer_passive_openmp

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("QLORA_OMP_PASSIVE", raising=False)
    import torch  # noqa: F401  (the suite has it loaded anyway)

    assert prefer_passive_openmp() is False and "OMP_WAIT_POLICY" not in os.environ
