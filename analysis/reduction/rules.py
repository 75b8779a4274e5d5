"""What token reduction requires of a ProxyV model, in one place: torch-free, read by the variant's resolution
(:mod:`analysis.families`), the execution (:mod:`.runtime`, :mod:`.visionzip`) and the FLOPs
(:mod:`analysis.flops.proxyv_reduction`).

ProxyV plans its proxies over the vision tokens alive at its start layer L, so every drop must come at or
before L; and token reduction breaks the crop grid that spatial proxies downsample, so only learned proxies
combine with it (the paper's non-spatial proxies). Proxy-free ProxyV (``init="none"``) is refused too: not
implemented on the reduction's path.
"""

from __future__ import annotations

from collections.abc import Sequence


def drops(method: str, layers: Sequence[int]) -> tuple[int, ...]:
    """The layers before which ``method`` drops vision tokens: FastV's K (its layers are K..L-1), PyramidDrop's
    stage boundaries, none for VisionZip (it merges before the LLM)."""
    if method == "visionzip":
        return ()
    return tuple(layers[:1]) if method == "fastv" else tuple(layers)


def check_on_proxyv(method: str, start_layer: int, drop_layers: Sequence[int] = (), init: str | None = None) -> None:
    """One ValueError naming the fix when ``method`` cannot run on a ProxyV model from ``start_layer`` with
    proxies ``init`` (``None``: not known yet, e.g. while resolving a variant)."""
    if init == "none":
        raise ValueError(f"{method} on a ProxyV model without proxies (init='none'): not supported (the reduction's "
                         "ProxyV path, its FLOPs count and their reference test are written for learned proxies); "
                         "use a checkpoint with init='learned'")
    if init is not None and init != "learned":
        raise ValueError(f"{method} on a ProxyV model with spatial proxies: token reduction breaks the crop grid "
                         "that spatial proxies downsample; it needs learned proxies (a checkpoint with "
                         "init='learned'), as the paper does")
    last = max(drop_layers, default=None)
    if last is not None and last > start_layer:
        raise ValueError(f"{method} drops vision tokens before layer {last}, after ProxyV's start layer {start_layer}: "
                         f"every drop must come at or before layer {start_layer} (ProxyV's proxies are planned over "
                         "the tokens that remain at its start layer)")
