"""peak.return_freed_memory: large freed blocks leave the resident set instead of staying in the heap."""
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import ctypes, sys
    from qlora.train.peak import return_freed_memory
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
    def touched(n):
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        return p
    if sys.argv[1] == "1":
        assert return_freed_memory()
    libc.free(touched(16 << 20))  # freeing a big mmapped block raises glibc's dynamic threshold
    blocks = [touched(8 << 20) for _ in range(16)]
    before = rss()
    for p in blocks[::2]:  # every other block: the heap cannot trim them, live blocks sit between
        libc.free(p)
    print(before - rss())
""")


def _released(fix: bool) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if fix else "0"], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_freed_blocks_leave_the_resident_set():
    assert _released(fix=True) > 60 << 20  # all 64 MiB go back to the kernel
    assert _released(fix=False) < 8 << 20  # glibc's default keeps them: what the fix is for
