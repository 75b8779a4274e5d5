"""Which decoder layers a variant applies to: one resolver, so every entry point errors alike."""

from __future__ import annotations


def resolve_layers(n_layers: int, layers=None, start_layer=None, end_layer=None) -> list[int]:
    """Sorted layer indices from ``layers`` or ``start_layer``/``end_layer`` (end exclusive, default the
    last layer); neither: every layer. Raises ValueError naming the valid range."""
    if layers is not None and (start_layer is not None or end_layer is not None):
        raise ValueError("pass either layers= or start_layer=/end_layer=, not both")
    if layers is None:
        start = 0 if start_layer is None else start_layer
        end = n_layers if end_layer is None else end_layer
        for name, value in (("start_layer", start), ("end_layer", end)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if not 0 <= start < n_layers:
            raise ValueError(f"start_layer={start} is out of range: the model has {n_layers} decoder layers "
                             f"(valid 0..{n_layers - 1})")
        if not start < end <= n_layers:
            raise ValueError(f"end_layer={end} must be in {start + 1}..{n_layers} (exclusive end) "
                             f"for start_layer={start}")
        layers = range(start, end)
    resolved = sorted({int(i) for i in layers})
    if not resolved:
        raise ValueError("the layer range is empty; give at least one decoder layer index")
    bad = [i for i in resolved if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has {n_layers} decoder layers "
                         f"(valid 0..{n_layers - 1})")
    return resolved
