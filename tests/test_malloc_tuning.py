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


def test_info_says_it():
    out = subprocess.run([sys.executable, "-m", "falconnet.cli", "info"], capture_output=True, text=True, check=True,
                         env={**os.environ, "FALCONNET_MALLOC_TUNING": "0"})
    assert "malloc tuning (large freed blocks kept for reuse): off (FALCONNET_MALLOC_TUNING=0)" in out.stdout
