"""``import crossmae`` is quiet and cheap: no attention kernel (nor ``torch._dynamo``, which
they pull in) is imported until first use, and without NumPy nothing is printed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAZY = ("torch.nn.attention.varlen", "torch.nn.attention.flex_attention", "torch._dynamo")

# A meta-path finder that makes ``import numpy`` fail, as on a machine without NumPy.
NO_NUMPY = textwrap.dedent(
    """
    import sys

    class _NoNumpy:
        def find_spec(self, name, path=None, target=None):
            if name == "numpy" or name.startswith("numpy."):
                raise ModuleNotFoundError("No module named numpy (blocked for this test)", name=name)
            return None

    sys.meta_path.insert(0, _NoNumpy())
    """
)


def _run(code: str, *, pythonpath: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_import_loads_no_attention_kernel_and_a_cpu_forward_neither() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import crossmae as cm
        import torch
        lazy = {LAZY!r}
        assert not [m for m in lazy if m in sys.modules], [m for m in lazy if m in sys.modules]
        enc = cm.TransformerEncoder(16, 1, 2)
        pad = torch.tensor([[False, True, False]])
        enc(torch.randn(1, 3, 16), pad).tokens.sum().backward()
        assert not [m for m in lazy if m in sys.modules], [m for m in lazy if m in sys.modules]
        print("ok")
        """
    )
    res = _run(code, pythonpath=[str(ROOT)])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_import_without_numpy_is_quiet(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_NUMPY)
    check = "import sys; assert 'numpy' not in sys.modules; print('ok')"
    # the blocker works (plain `import torch` warns with it on some torch versions, e.g.
    # 2.13; crossmae must not, on any)
    base = _run("import torch; " + check, pythonpath=[str(tmp_path)])
    assert base.returncode == 0, base.stderr
    res = _run("import crossmae; " + check, pythonpath=[str(tmp_path), str(ROOT)])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    assert res.stderr == "", res.stderr
