"""keep_freed_memory: large CPU tensors come from glibc's heap and are reused, not unmapped."""

import subprocess
import sys

import pytest
import torch

from diffurec.allocator import glibc
from diffurec.config import Config
from diffurec.training import configure_process

# in a fresh process: the setting is process-wide and cannot be undone
SCRIPT = r"""
import ctypes, ctypes.util
import torch
from diffurec.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = MallInfo2
SIZE = 40 << 20  # above glibc's largest mmap threshold (32 MB): always mmapped by default

def mapped_while_held():
    x = torch.empty(SIZE, dtype=torch.uint8)
    x.fill_(1)
    return libc.mallinfo2().hblkhd

before = libc.mallinfo2().hblkhd
default_mapped = mapped_while_held() - before
assert keep_freed_memory() and keep_freed_memory()  # idempotent
kept_mapped = mapped_while_held() - libc.mallinfo2().hblkhd
heap_after_first = libc.mallinfo2().arena
mapped_while_held()
print(default_mapped >= SIZE, kept_mapped == 0, libc.mallinfo2().arena >= SIZE, libc.mallinfo2().arena == heap_after_first)
"""


@pytest.mark.skipif(glibc() is None or not hasattr(glibc(), "mallinfo2"), reason="needs glibc (mallopt, mallinfo2)")
def test_large_tensors_come_from_the_heap_and_are_reused_once_kept():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    # by default a 40 MB tensor is its own mmap; once kept, it is heap memory, and the freed heap
    # serves the next one without growing
    assert out == ["True", "True", "True", "True"]


def test_training_processes_keep_freed_memory_on_cpu_only_and_when_configured(monkeypatch):
    calls = []
    monkeypatch.setattr("diffurec.training.keep_freed_memory", lambda: calls.append(1) or True)
    threads = torch.get_num_threads()
    configure_process(Config(), torch.device("cpu"))
    assert calls == [1]
    configure_process(Config().with_sets(["keep_freed_memory=false"]), torch.device("cpu"))
    configure_process(Config(), torch.device("cuda"))
    assert calls == [1]
    assert torch.get_num_threads() == threads  # threads = 0 leaves torch's own
