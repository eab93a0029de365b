"""Loading a SADI adapter needs `import sadi_peft` first: PEFT has no plugin discovery (documented behaviour)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import sadi_peft
from peft import get_peft_model
from tiny_models import PAIRS, CharTokenizer, tiny_llama


REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_loading_without_import_fails_and_with_import_works(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), sadi_peft.SADIConfig(top_k=1))
    sadi_peft.calibrate(model, CharTokenizer(), PAIRS, show_progress=False)
    model.save_pretrained(tmp_path / "adapter")

    without = _run(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r})
        except KeyError as error:
            assert "sadi_peft" not in sys.modules
            print("KeyError", error)
        """,
        tmp_path,
    )
    assert without.returncode == 0, without.stderr
    assert "KeyError 'SADI'" in without.stdout

    with_import = _run(
        f"""
        import sadi_peft
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r})
        print(type(model).__name__, sorted(model.peft_config))
        """,
        tmp_path,
    )
    assert with_import.returncode == 0, with_import.stderr
    assert "LlamaForCausalLM ['default']" in with_import.stdout
