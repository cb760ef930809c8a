"""Run in a subprocess by test_tiny_models (vLLM's CPU backend pins threads of the process that
loads it, so it stays out of the pytest process): greedy-generate with vLLM (EOS suppressed for max_tokens, like HF min_new_tokens) and print the
token ids as JSON."""
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from PIL import Image  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

model, prompts_file, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
items = json.loads(open(prompts_file).read())
llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0, enable_prefix_caching=False)
reqs = []
for it in items:
    r = {"prompt": it["prompt"]}
    if it.get("image"):
        r["multi_modal_data"] = {"image": Image.open(it["image"]).convert("RGB")}
    reqs.append(r)
outs = llm.generate(reqs, SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0), use_tqdm=False)
print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
