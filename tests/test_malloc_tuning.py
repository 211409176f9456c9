"""falconnet/malloc_tuning.py: every `falconnet` command raises glibc's mmap and trim thresholds at
start, unless the user set them or turned it off. Each case runs in its own process (the setting
is process-wide); the speed it buys is measured, not tested (the module's docstring, README)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
GLIBC_VERSION = tuple(int(v) for v in platform.libc_ver()[1].split(".")[:2]) if GLIBC else (0, 0)


def info_json(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "FALCONNET_MALLOC"))}
    full.update(env)
    out = subprocess.run([sys.executable, "-m", "falconnet.cli", "info", "--json"], capture_output=True, text=True,
                         env=full, check=True)
    return json.loads(out.stdout)


def test_commands_apply_it_by_default():
    assert info_json()["malloc_tuning"] == ("mallopt" if GLIBC else "unsupported")


@pytest.mark.parametrize("env, expected", [({"FALCONNET_MALLOC_TUNING": "0"}, "off"),
                                           ({"MALLOC_TRIM_THRESHOLD_": "1048576"}, "env"),
                                           ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, "env")])
def test_user_settings_win(env, expected):
    assert info_json(**env)["malloc_tuning"] == expected


def test_library_import_changes_nothing_and_apply_is_idempotent():
    code = ("from falconnet import malloc_tuning; import falconnet; s0 = malloc_tuning.state(); "
            "print(s0, malloc_tuning.apply(), malloc_tuning.apply())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "FALCONNET_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    state = "mallopt" if GLIBC else "unsupported"
    assert out.stdout.split() == ["not", "applied", state, state]


# Whether a 64 MiB block comes from mmap (glibc's default above its threshold) or from the heap:
# the observable effect of the tuning (glibc >= 2.33 has mallinfo2)
_EFFECT = """
import ctypes, sys
from falconnet import malloc_tuning
state = malloc_tuning.apply()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)
print(state, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(GLIBC_VERSION < (2, 33), reason="needs glibc >= 2.33 (mallinfo2)")
@pytest.mark.parametrize("tuning", ["1", "0"])
def test_large_blocks_stop_coming_from_mmap(tuning):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "FALCONNET_MALLOC"))}
    env["FALCONNET_MALLOC_TUNING"] = tuning
    out = subprocess.run([sys.executable, "-c", _EFFECT], capture_output=True, text=True, env=env, check=True)
    state, mmapped = out.stdout.split()
    if tuning == "1":
        assert state == "mallopt" and int(mmapped) == 0  # served from the heap, kept for reuse
    else:
        assert state == "off" and int(mmapped) >= 64 << 20  # glibc's default: a fresh mapping


def test_programmatic_cli_calls_leave_the_allocator_alone():
    code = ("from falconnet import cli, malloc_tuning; cli.main(['info', '--json']); "
            "print('STATE', malloc_tuning.state())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "FALCONNET_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().endswith("STATE not applied")


def test_glibc_tunables_count_as_user_set():
    assert info_json(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1048576")["malloc_tuning"] == "env"


def test_info_says_it():
    out = subprocess.run([sys.executable, "-m", "falconnet.cli", "info"], capture_output=True, text=True, check=True,
                         env={**os.environ, "FALCONNET_MALLOC_TUNING": "0"})
    assert "malloc tuning (large freed blocks kept for reuse): off (FALCONNET_MALLOC_TUNING=0)" in out.stdout
