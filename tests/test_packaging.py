"""The installed distribution claims only the `v4train` import name: a user's own `data`, `model`,
`kernels`, `parallel` or `orchestrator` package keeps working beside it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

USER_PACKAGES = ("data", "model", "kernels", "parallel", "orchestrator")


def test_user_packages_with_generic_names_are_not_shadowed(tmp_path):
    for name in USER_PACKAGES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'user:{name}'\n")
    script = textwrap.dedent("""
        import importlib
        import v4train.orchestrator.tools.cli, v4train.data.loader, v4train.model.transformer
        for name in {names!r}:
            mod = importlib.import_module(name)
            assert mod.OWNER == "user:" + name, (name, mod.__file__)
            ours = importlib.import_module("v4train." + name)
            assert ours.__file__ != mod.__file__
        print("ok")
    """).format(names=USER_PACKAGES)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_console_script_entry_point_resolves():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "v4train"]
    assert ep.value == "v4train.orchestrator.tools.cli:main"
    from v4train.orchestrator.tools.cli import main

    assert ep.load() is main
