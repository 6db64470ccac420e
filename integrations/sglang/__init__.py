"""kdn_hf for SGLang 0.5.23: a ``kdn`` radix-cache backend sharing one KV store with the HF path.

    pip install kdn-hf            # the entry point registers the backend in every SGLang process
    KDN_STORE=redis://cache:6379/0 python -m sglang.launch_server --model-path DIR --dtype float32 \\
        --radix-cache-backend kdn

- ``cache``: ``KDNRadixCache`` (exact entries from the store join the tree; prompts are stored back).
- ``units``: chunk boundaries from clients (``custom_params["kdn_chunks"]``) or fixed blocks.
- ``client``: prompt ids and sampling params for ``sglang.Engine``, the HTTP API and the OpenAI client.
- ``plugin``: the ``sglang.srt.plugins`` entry point and the factory SGLang's registry calls.
- ``settings``: ``KDNSettings`` (from KDN_STORE / KDN_NAMESPACE / KDN_CODEC) and what is refused.

Importing this package imports no SGLang module; ``cache``, ``plugin`` and ``settings`` need it.
"""
