"""Constants and helpers shared by the Transformers adapter tests (a module with a unique name, so that it does
not clash with other test folders' helpers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

N_BLOCKS = 1  # decoder blocks kept from the demo model (quantizing is the slow part on a 2-core machine)
NSAMPLES, SEQLEN = 4, 128  # calibration windows
SETTINGS = dict(bits=4, group_size=128, desc_act=True)  # group 128 leaves a partial last group (576 inputs)
CLI_FLAGS = ["--bits", "4", "--group-size", "128", "--act-order", "--no-static-groups", "--mse", "0",
             "--no-refit-scales", "--gptaq", "0"]  # = SETTINGS (GPTQPluginConfig's defaults: plain GPTQ)
LOGGER = "gptq_plugin.adapters.transformers"


def rewrite_quantization_config(ckpt: Path, out: Path, meta: dict | None = None, **changes) -> Path:
    """A copy of checkpoint ``ckpt`` at ``out`` whose ``quantization_config`` (in config.json and
    quantize_config.json) has the fields ``changes`` replaced and ``meta`` merged into its ``meta``."""
    shutil.copytree(ckpt, out)
    for name in ("config.json", "quantize_config.json"):
        f = out / name
        if not f.is_file():
            continue
        d = json.loads(f.read_text())
        q = d["quantization_config"] if name == "config.json" else d
        q.update(changes)
        if meta:
            q["meta"] = {**q.get("meta", {}), **meta}
        f.write_text(json.dumps(d, indent=2))
    return out
