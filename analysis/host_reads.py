"""Find the operations that read device values back to the host.

On a GPU, ``bool(t.any())``, ``t.item()``, a boolean-mask index or ``t.nonzero()`` make the host wait for the device
to finish everything queued so far. In a forward where the host normally queues kernels far ahead of the device
(a long prefill's first layers are device-bound), one such read in a cheap layer (a skipped one, a ProxyV one)
empties the queue, and every later layer then waits for its kernels to be launched one by one: the layer costs its
Python time, not its FLOPs. The operators and ProxyV therefore decide everything data-dependent before the forward
(the core's pre-hook) and run their layers without host reads; :func:`host_reads` checks that, on any device::

    with host_reads() as reads:
        model(**batch)
    reads  # [HostRead(op='aten.nonzero', where='analysis/x.py:12'), ...]

It sees the aten operations under a ``TorchDispatchMode``: value reads (``item`` / ``bool`` / ``int``), ``nonzero``,
``masked_select``, ``unique``, ``repeat_interleave`` by a tensor, boolean-mask indexing, and copies from a device to
the CPU. On the CPU these cost nothing, but they are the same calls, so a CPU run finds them.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
          aten.repeat_interleave.Tensor, aten._unique2.default, aten.unique_consecutive.default,
          aten.unique_dim.default, aten.equal.default, aten.is_nonzero.default}
_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


@dataclass(frozen=True)
class HostRead:
    op: str  # the aten operation
    where: str  # "file:line" of the innermost caller outside torch


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _to_host(func, args, kwargs) -> bool:
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{_short(frame.filename)}:{frame.lineno}"
    return "?"


def _short(filename: str) -> str:
    for marker in ("/analysis/", "/transformers/", "/tests/", "/experiments/"):
        if marker in filename:
            return marker[1:] + filename.split(marker, 1)[1]
    return filename


class _Recorder(TorchDispatchMode):
    def __init__(self, reads: list):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS or (func in _INDEXED and _bool_index(args)) or _to_host(func, args, kwargs):
            self.reads.append(HostRead(str(func.overloadpacket).replace("aten::", "aten."), _caller()))
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_reads():
    """Record every host read of device values in the block: yields the list it fills with :class:`HostRead`."""
    reads: list[HostRead] = []
    with _Recorder(reads):
        yield reads


class LayerReads:
    """Host reads from decoder layer ``start``'s forward to the end of the language model's forward, the span
    the operators and ProxyV change: hooks on ``layers[start]`` and ``language_model`` switch the recorder on and
    off. ``reads`` holds the last call's; :meth:`remove` takes the hooks off."""

    def __init__(self, language_model, layers, start: int):
        self.reads: list[HostRead] = []
        self._recorder: _Recorder | None = None
        self._handles = [layers[start].register_forward_pre_hook(self._on),
                         language_model.register_forward_hook(self._off)]

    def _on(self, *args):
        if self._recorder is None:
            self.reads = []
            self._recorder = _Recorder(self.reads)
            self._recorder.__enter__()

    def _off(self, *args):
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder = None

    def remove(self) -> None:
        self._off()
        for handle in self._handles:
            handle.remove()
