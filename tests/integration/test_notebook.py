"""examples/blending.ipynb executes on the bundled model (nbclient + ipykernel), and what it shows is
what the library computes: its answers and KLs are recomputed here, outside the notebook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdn_hf import KDN
from kdn_hf.compat import cache_kwarg

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "blending.ipynb"
MARK = "KDN_NOTEBOOK_STATE "

#: appended to the executed copy only: the notebook's own variables, as JSON on one line
DUMP = ("import json\n"
        f"print({MARK!r} + json.dumps({{'chunks': chunks, 'kl': kl, 'answers': "
        "{n: r.token_ids for n, r in results.items()}, 'prompt_ids': {n: r.prompt_ids for n, r in results.items()}, "
        "'methods': methods}))")


def _first_logp(model, cache, question):
    ctx = cache.get_seq_length()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([question]), position_ids=torch.arange(ctx, ctx + len(question))[None],
                    **{cache_kwarg(model): cache})
    return F.log_softmax(out.logits[0, -1].float(), -1)


@pytest.mark.slow
def test_blending_notebook_shows_what_the_library_computes(smol):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(DUMP))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    lines = [line for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             for line in o.get("text", "").splitlines() if line.startswith(MARK)]
    assert len(lines) == 1, "the notebook's state was not printed"
    state = json.loads(lines[0][len(MARK):])
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])), "no plot shown"

    model, tok = smol
    kdn = KDN(model, tok, store="memory://")
    chunks = state["chunks"]
    kdn.ingest(chunks[:-1], progress=False)
    prompt = state["prompt_ids"]["full"]
    assert all(p == prompt for p in state["prompt_ids"].values()), "methods answered different prompts"
    # full: stock generate on the same ids
    stock = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert state["answers"]["full"] == stock[:len(state["answers"]["full"])]
    ref = _first_logp(model, kdn.prepare(chunks[:-1], mode="full"), chunks[-1])
    for name, kw in state["methods"].items():
        res = kdn.generate(chunks, max_new_tokens=12, **kw)
        assert res.token_ids == state["answers"][name], name
        got = F.kl_div(_first_logp(model, kdn.prepare(chunks[:-1], **kw), chunks[-1]), ref, log_target=True,
                       reduction="sum").item()
        assert abs(got - state["kl"][name]) <= 1e-4 + 1e-3 * got, (name, got, state["kl"][name])
    # the notebook's point holds on its own example: blend is closer to full prefill than plain reuse
    assert state["kl"]["blend (kdn)"] < state["kl"]["reuse"]
