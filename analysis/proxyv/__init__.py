"""ProxyV on HF LLaVA models: a few proxy tokens do the heavy computation for the vision tokens.

    from analysis.proxyv import apply_proxyv, load_proxyv, proxyv_parameters
    model = apply_proxyv(model, start_layer=12, reduce_factor=4, init="spatial")   # or init="learned"
    model.save_pretrained(path)
    model = load_proxyv(path, dtype=torch.bfloat16)                                 # one call back

From the start layer L on, each decoder layer attends with queries [proxies, text] over keys
[full vision, proxies, text]; the full vision tokens skip attention and FFN and receive a light
MLP update guided by their spatially corresponding proxy. Proxies are made at layer L from each
crop (bilinear downsampling, or learned queries) and never enter the KV cache. ``init="none"`` has no
proxies: the vision tokens get a context-free light MLP (the paper's Table 2 variant).

Paper: "Streamline Without Sacrifice -- Squeeze out Computation Redundancy in LMM", Wu, Lu, Liu,
ICML 2025 (arXiv 2505.15816); reference code github.com/penghao-wu/ProxyV. Design notes, the
differences from the reference code and measured speed: docs/proxyv.md.
"""

from .apply import (
    ProxyVSettings,
    ProxyVShapes,
    apply_proxyv,
    proxyv_parameters,
    proxyv_shapes,
)
from .io import load_proxyv

__all__ = ["ProxyVSettings", "ProxyVShapes", "apply_proxyv", "load_proxyv", "proxyv_parameters", "proxyv_shapes"]
