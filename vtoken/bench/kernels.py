"""Which scaled-dot-product-attention kernel a prefill runs, with and without pruning.

For a single unpadded prompt, transformers' sdpa path passes no mask and ``is_causal=True``, which
lets PyTorch pick a fused kernel (flash, memory-efficient, cuDNN). Dropping tokens must keep it so:
a materialised ``(L, L)`` mask where a causal one suffices would cost memory and, on a GPU, rule out
the flash kernel. :func:`check_kernels` records every SDPA call of one prefill (the mask it got,
through a ``TorchFunctionMode``; the ATen kernel that ran, through the profiler) and, on CUDA, runs
the prefill again with only the fused backends allowed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

import vtoken

#: ATen operators of the SDPA backends, by the name a report gives them.
KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_attention_math": "math",
}


@dataclass
class KernelCheck:
    """The SDPA calls of one prefill.

    Attributes:
        label: ``"baseline"`` or the plugin setting.
        decoder_calls: SDPA calls of the decoder layers.
        masked_calls: those given a materialised mask (0 expected for one unpadded prompt).
        causal_calls: those asked for ``is_causal=True`` (all of them expected).
        kernels: calls per kernel, vision tower included (``{"flash": 56}``).
        fused_only: whether the prefill also runs with only the fused backends allowed; ``None``
            off CUDA, where PyTorch has no such choice to check.
    """

    label: str
    decoder_calls: int = 0
    masked_calls: int = 0
    causal_calls: int = 0
    kernels: dict[str, int] = field(default_factory=dict)
    fused_only: bool | None = None

    @property
    def passed(self) -> bool:
        causal = self.masked_calls == 0 and self.causal_calls == self.decoder_calls > 0
        return causal and self.fused_only is not False and "math" not in self.kernels


class _SdpaCalls(TorchFunctionMode):
    """Records ``(in_decoder, mask is None, is_causal)`` of every SDPA call while active."""

    def __init__(self) -> None:
        super().__init__()
        self.in_decoder = False
        self.calls: list[tuple[bool, bool, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
            self.calls.append((self.in_decoder, mask is None, bool(causal)))
        return func(*args, **kwargs)


def check_kernels(model, inputs: dict, plugins, label: str) -> KernelCheck:
    """One prefill of ``model`` on ``inputs`` (one unpadded prompt) with ``plugins`` attached."""
    parts = vtoken.locate_parts(model)
    recorder = _SdpaCalls()
    hooks = [
        parts.language_model.register_forward_pre_hook(lambda *_: setattr(recorder, "in_decoder", True)),
        parts.language_model.register_forward_hook(lambda *_: setattr(recorder, "in_decoder", False)),
    ]
    try:
        with vtoken.attach(model, plugins), torch.no_grad():
            with profile(activities=[ProfilerActivity.CPU]) as prof, recorder:
                model(**inputs)
            fused = _fused_only(model, inputs) if model.device.type == "cuda" else None
    finally:
        for hook in hooks:
            hook.remove()
    decoder = [call for call in recorder.calls if call[0]]
    kernels = Counter({KERNELS[e.key]: e.count for e in prof.key_averages() if e.key in KERNELS})
    return KernelCheck(
        label=label,
        decoder_calls=len(decoder),
        masked_calls=sum(not no_mask for _, no_mask, _ in decoder),
        causal_calls=sum(causal for _, _, causal in decoder),
        kernels=dict(kernels),
        fused_only=fused,
    )


def _fused_only(model, inputs: dict) -> bool:
    """Whether a prefill runs with the math backend ruled out (PyTorch raises when no fused
    kernel accepts a call, e.g. flash with a materialised mask and nothing else allowed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    try:
        with sdpa_kernel(fused):
            model(**inputs)
    except RuntimeError:
        return False
    return True
