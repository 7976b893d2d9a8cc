"""The trainer's glibc malloc settings (``sevo_jax/host_memory.py``)."""

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sevo_jax import host_memory

ROOT = Path(__file__).resolve().parents[1]


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(ctypes.CDLL(None).gnu_get_libc_version)
    except (OSError, AttributeError):
        return False


# malloc, touch and free a 64 MiB block five times on a worker thread (as XLA:CPU's threads do)
# and count the minor page faults of the last four rounds
FAULTS = textwrap.dedent("""
    import ctypes, json, resource, sys, threading
    from sevo_jax import host_memory
    applied = host_memory.keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size, faults = 64 << 20, []
    def rounds():
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(size)
            ctypes.memset(p, 1, size)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=rounds)
    t.start(); t.join()
    print(json.dumps({"applied": applied, "faults": max(faults[1:])}))
""")


def _faults(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in host_memory.USER_SETTINGS + ("SEVO_JAX_KEEP_MALLOC",)}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc(), reason="glibc malloc only")
def test_freed_blocks_are_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    default = _faults({"SEVO_JAX_KEEP_MALLOC": "1"})
    kept = _faults({})
    assert default == {"applied": False, "faults": default["faults"]}
    # glibc's default faults every round's pages in again: one per 4 KiB page here, one per
    # 2 MiB where transparent huge pages are "always" on
    assert default["faults"] >= (64 << 20) // (2 << 20)
    assert kept["applied"] is True
    assert kept["faults"] < min(pages // 50, default["faults"])


@pytest.mark.parametrize("env", [{"SEVO_JAX_KEEP_MALLOC": "1"}, {"MALLOC_ARENA_MAX": "4"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_the_users_own_settings_win(env):
    assert host_memory.keep_freed_memory(env) is False


def test_off_linux_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert host_memory.keep_freed_memory({}) is False
