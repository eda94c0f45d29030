"""The one dispatch point for the absorber's losses.

hidden_sync_loss(student, teacher, kind)   student/teacher (L, N, D) stacked hidden states
linear_kl_loss(student_h, weight, teacher_h | teacher_logp, temperature)
                                           mean over N of KL(teacher || student) through the head W

Implementations ("impl" argument, else set_loss_impl(...), else env NANOABSORBER_LOSS, else "auto"):
    "auto"   Triton kernels for CUDA tensors, PyTorch on CPU (the chunked path for the KL)
    "triton" always the Triton kernels (on CPU only under TRITON_INTERPRET=1, which is how the
             tests exercise them)
    "torch"  pure PyTorch: autograd reference for the sync distance, chunked PyTorch for the KL
The path taken is printed once to stderr as "[nanoabsorber] ...", unless NANOABSORBER_QUIET is set.
The math of every loss is documented in kernels/sync_distance.py and kernels/fused_linear_kl.py.
"""
import os

import torch

from .attention import say_once as _say_once

_IMPLS = ("auto", "torch", "triton")
_IMPL = os.environ.get("NANOABSORBER_LOSS", "auto")


def set_loss_impl(impl: str) -> None:
    """"auto" | "torch" | "triton" for every later call that does not pass impl=..."""
    global _IMPL
    if impl not in _IMPLS:
        raise ValueError(f"loss impl must be one of {_IMPLS}, not {impl!r}")
    _IMPL = impl


def _resolve(impl: str | None, x: torch.Tensor) -> str:
    impl = impl or _IMPL
    if impl not in _IMPLS:
        raise ValueError(f"loss impl must be one of {_IMPLS}, not {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda else "torch"
    if impl == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("loss impl 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before the "
                           "kernels are imported; use impl='torch' (or 'auto') on CPU")
    return impl


def hidden_sync_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "l1", impl: str | None = None,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sync distance between stacked hidden states; student, teacher (L, N, D), teacher has no grad.
    kind: "l1" (mean |S-T|), "mse" (mean (S-T)^2), "l1_norm" (per-layer L1 / teacher L1, averaged).
    weights: optional (N,) per-position weights (normalised to mean 1). Returns an fp32 scalar."""
    path = _resolve(impl, student)
    teacher = teacher.detach()
    if path == "triton":
        from kernels.sync_distance import sync_distance

        _say_once(f"hidden_sync_loss: Triton kernel on {student.device.type}")
        return sync_distance(student, teacher, kind, weights)
    from kernels.sync_distance import sync_distance_reference

    _say_once(f"hidden_sync_loss: PyTorch on {student.device.type}")
    return sync_distance_reference(student, teacher, kind, weights)


def linear_kl_loss(student_h: torch.Tensor, weight: torch.Tensor, teacher_h: torch.Tensor | None = None,
                   teacher_logp: torch.Tensor | None = None, temperature: float = 1.0, chunk_size: int = 1024,
                   impl: str | None = None) -> torch.Tensor:
    """Mean over the N rows of KL(softmax(z_t / tau) || softmax(student_h W^T / tau)), no tau^2 factor.
    student_h (N, D) post-final-norm hidden states, weight (V, D) output head; the teacher is either
    teacher_h (N, D) (logits through the same weight) or teacher_logp (N, V). Chunked over N so the
    full (N, V) logits never exist; gradients w.r.t. student_h (and weight if it requires grad)."""
    from kernels.fused_linear_kl import fused_linear_kl

    path = _resolve(impl, student_h)
    _say_once(f"linear_kl_loss: {'Triton kernel' if path == 'triton' else 'chunked PyTorch'} "
              f"on {student_h.device.type}")
    return fused_linear_kl(student_h, weight, h_t=teacher_h, teacher_logp=teacher_logp, temperature=temperature,
                           chunk_size=chunk_size, use_triton=path == "triton")
