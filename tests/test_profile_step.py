"""experiments/profile_step.py end to end on the tiny preset: the trace is read and every row attributed."""

import pathlib
import re
import subprocess
import sys

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "profile_step.py"


def test_profile_step_attributes_the_step_to_model_modules(tmp_path):
    out = subprocess.run([sys.executable, str(_SCRIPT), "--preset=tiny", "--batch=1", "--seq=32", "--steps=3",
                          "--top=5", f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    total = float(re.search(r"summed thread time ([\d,.]+) ms", out.stdout).group(1).replace(",", ""))
    rows = {(phase, module): float(ms.replace(",", "")) for phase, module, ms in
            re.findall(r"^\| (fwd|bwd|-|\?) \| (\w+) \| ([\d,.]+) \| \d+% \|$", out.stdout, re.M)}
    # The tiny model's MoE and attention layers run forward and backward; the optimizer runs outside the model.
    for key in [("fwd", "moe"), ("bwd", "moe"), ("fwd", "attn"), ("bwd", "attn"), ("-", "step")]:
        assert rows.get(key, 0) > 0, (key, out.stdout)
    assert total > 0 and abs(sum(rows.values()) - total) <= 0.05 * len(rows) + 0.1, (rows, total)
    # Most of the time maps back to model ops through the HLO dump, not to unnamed XLA ops.
    assert rows.get(("?", "unmapped"), 0) < 0.5 * total, rows
    assert list(tmp_path.glob("hlo/*jit_step*after_optimizations.txt")), "the HLO dump is where the names come from"
