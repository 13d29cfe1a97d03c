"""keep_freed_memory: after it, a large tensor comes from glibc's heap, not a fresh mmap (checked in a subprocess:
the setting is process-wide)."""
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, sys, torch
from repbend.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def mmapped(): return libc.mallinfo2().hblkhd
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
before = mmapped()
x = torch.ones(64 * 1024 * 1024 // 4)
print(mmapped() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_come_from_the_heap_after_keep_freed_memory():
    def grown(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert grown("system") >= 64 * 1024 * 1024      # glibc's default: a 64 MB block is its own mmap
    assert grown("keep") == 0
