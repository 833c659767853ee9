"""GPU kernels and compiler passes for the fast path (policy.compile, policy.fused_norm_silu): optional, imported only
when asked for; triton comes with the `gpu` extra."""
