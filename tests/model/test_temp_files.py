"""temp_files: what a killed writer left beside its target is removed (or put back) by the next writer, and only that."""
import os
import socket
import subprocess
import sys

from qlora.model.temp_files import remove_stale, temp_beside


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_dead_writers_temps_are_removed_and_no_others(tmp_path):
    target, host = tmp_path / "out.gguf", socket.gethostname()
    dead, live = dead_pid(), os.getpid()
    stale_file = tmp_path / f".out.gguf.tmp-{host}-{dead}-abc.tmp"
    stale_dir = tmp_path / f".out.gguf.tmp-{host}-{dead}-def"
    keep = [tmp_path / f".out.gguf.tmp-{host}-{live}-ghi.tmp",  # a live writer's
            tmp_path / f".out.gguf.tmp-otherhost-{dead}-jkl.tmp",  # another machine's (shared filesystem)
            tmp_path / f".other.gguf.tmp-{host}-{dead}-mno.tmp",  # another target's
            tmp_path / "out.gguf.tmp"]
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    for p in keep:
        p.write_bytes(b"x")
    tmp = temp_beside(target, suffix=".tmp")
    assert not stale_file.exists() and not stale_dir.exists()
    assert all(p.exists() for p in keep)
    assert tmp.parent == tmp_path and tmp.name.startswith(f".out.gguf.tmp-{host}-{live}-") and tmp.stat().st_size == 0
    assert temp_beside(target, directory=True).is_dir()


def test_a_previous_output_moved_aside_comes_back_if_the_target_is_missing(tmp_path):
    """A writer killed between `target -> .old` and `tmp -> target` leaves no target: the next
    writer puts the old one back before it starts, so a failure of its own loses nothing."""
    target, host = tmp_path / "adapter", socket.gethostname()
    old = tmp_path / f".adapter.tmp-{host}-{dead_pid()}-xyz.old"
    old.mkdir()
    (old / "adapter_config.json").write_text("{}")
    assert remove_stale(target) == [old]
    assert (target / "adapter_config.json").read_text() == "{}" and not old.exists()
