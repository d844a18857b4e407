"""What people use today to compute a MoLoRA delta, for benchmarks and `moe-ext bench`.
Same arguments as functional.molora: x (T, D), router_logits (T, E), lora_A (E, R, D),
lora_B (E, O, R), top_k, scaling -> (T, O)."""
from __future__ import annotations

import torch


def loop_over_experts(x, logits, A, B, top_k, scaling):
    """MixLoRA-style: route, then for each expert gather its tokens and run two matmuls."""
    probs = torch.softmax(logits, dim=-1)
    w, e = probs.topk(top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    y = x.new_zeros(x.shape[0], B.shape[1])
    for i in range(A.shape[0]):
        tok, slot = torch.where(e == i)
        if tok.numel() == 0:
            continue
        out = (x[tok] @ A[i].T) @ B[i].T * (scaling * w[tok, slot, None])
        y = y.index_add(0, tok, out)
    return y


def dense_soft(x, logits, A, B, top_k, scaling):
    """LoRAMoE-style dense soft routing: every expert on every token, softmax-weighted
    (a different, denser model; top_k is ignored)."""
    E, R, D = A.shape
    probs = torch.softmax(logits, dim=-1)
    h = (x @ A.reshape(E * R, D).T).view(-1, E, R) * (scaling * probs[:, :, None])
    return h.reshape(-1, E * R) @ B.permute(0, 2, 1).reshape(E * R, -1)
