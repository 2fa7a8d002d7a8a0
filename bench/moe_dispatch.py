"""The MoE forward's time per token: routed dispatch against every expert on every token.

Run (about a minute on a 2-core CPU; prints the numbers, writes nothing):
  PYTHONPATH=$PWD python bench/moe_dispatch.py

One sparse MoE block (16 experts, top-2, d=256, f=1024, SiLU-gated experts, Mixtral routing) on
4096 tokens, float32, jitted and warm, the median of several runs. "routed" is
`jaxlens.models.moe.RoutedExperts` as the decoder runs it (dispatch "auto": on CPU the blocked
grouped matmul); "dense" computes all E experts for every token, one expert at a time, and
weights their outputs by the routing (zero for the experts not chosen): the same numbers at E/k
times the matmul work, the ratio compared. Shown once each: "dense, one einsum" (the same with
`[E, n, f]` intermediates, slower still: memory-bound) and "ragged_dot on CPU", the sorted
dispatch with `jax.lax.ragged_dot`, whose CPU lowering masks a dense product (why the CPU path
exists). The outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.models import moe


def _dense_weights(params, x_nd, spec: moe.MoESpec):
    """The routing as a dense `[n, E]` matrix (zero for the experts not chosen)."""
    logits_ne = x_nd @ params["gate"]["kernel"]
    weights_nk, experts_nk = moe.route(logits_ne, spec.top_k, spec.normalise_top_k)
    weights_ne = jnp.zeros(logits_ne.shape, x_nd.dtype)
    return weights_ne.at[jnp.arange(len(x_nd))[:, None], experts_nk].set(weights_nk)


def _dense_block(params, x_btd, spec: moe.MoESpec):
    """Every expert on every token, one expert at a time (a scan: each step's `[n, f]` stays in
    cache), outputs weighted by the routing and summed."""
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    weights_en = _dense_weights(params, x_nd, spec).T
    bank = params["experts"]
    gate_name, up_name, down_name = spec.projections

    def one_expert(y_nd, expert):
        gate_df, up_df, down_fd, weights_n = expert
        hidden_nf = jax.nn.silu(x_nd @ gate_df) * (x_nd @ up_df)
        return y_nd + weights_n[:, None] * (hidden_nf @ down_fd), None

    experts = (bank[gate_name], bank[up_name], bank[down_name], weights_en)
    y_nd, _ = jax.lax.scan(one_expert, jnp.zeros_like(x_nd), experts)
    return y_nd.reshape(b, t, d)


def _dense_einsum_block(params, x_btd, spec: moe.MoESpec):
    """The same in one einsum per projection (`[E, n, f]` intermediates: memory-bound here)."""
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    weights_ne = _dense_weights(params, x_nd, spec)
    bank = params["experts"]
    gate_name, up_name, down_name = spec.projections
    hidden_enf = jax.nn.silu(jnp.einsum("nd,edf->enf", x_nd, bank[gate_name]))
    hidden_enf = hidden_enf * jnp.einsum("nd,edf->enf", x_nd, bank[up_name])
    y_end = jnp.einsum("enf,efd->end", hidden_enf, bank[down_name])
    return jnp.einsum("ne,end->nd", weights_ne, y_end).reshape(b, t, d)


def _median_seconds(calls: dict, repeats: int) -> dict:
    """Median wall time of each jitted call, warm; the calls take turns, so that load from other
    processes on a shared machine falls on all of them alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # compile and warm
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--f", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    spec = moe.MoESpec(
        num_experts=args.experts,
        top_k=args.top_k,
        width=args.f,
        normalise_top_k=True,
        activation="silu",
        projections=("w1", "w3", "w2"),
        block_name="block_sparse_moe",
    )
    rng = np.random.default_rng(0)
    x_btd = jnp.asarray(rng.normal(size=(4, args.tokens // 4, args.d)), jnp.float32)
    block = moe.RoutedExperts(spec, args.d, jax.nn.silu)
    params = jax.jit(block.init)(jax.random.key(0), x_btd)["params"]
    params["gate"]["kernel"] = params["gate"]["kernel"] * 50.0  # decisive, varied routing

    routed = jax.jit(block.apply)
    ragged = jax.jit(moe.RoutedExperts(spec, args.d, jax.nn.silu, dispatch="ragged_dot").apply)
    dense = jax.jit(lambda p, x: _dense_block(p, x, spec))
    dense_einsum = jax.jit(lambda p, x: _dense_einsum_block(p, x, spec))
    want = np.asarray(dense(params, x_btd))
    np.testing.assert_allclose(dense_einsum(params, x_btd), want, atol=1e-4, rtol=1e-4)
    for fn in (routed, ragged):
        np.testing.assert_allclose(fn({"params": params}, x_btd), want, atol=1e-4, rtol=1e-4)
    _, experts_nk = moe.route(
        x_btd.reshape(-1, args.d) @ params["gate"]["kernel"], spec.top_k, True
    )
    load_e = np.bincount(np.asarray(experts_nk).ravel(), minlength=args.experts)

    n = x_btd.shape[0] * x_btd.shape[1]
    variables = {"params": params}
    seconds = _median_seconds(
        {"routed": (routed, (variables, x_btd)), "dense": (dense, (params, x_btd))}, args.repeats
    )
    seconds |= _median_seconds(
        {
            "dense, one einsum": (dense_einsum, (params, x_btd)),
            "ragged_dot on CPU": (ragged, (variables, x_btd)),
        },
        repeats=1,
    )
    print(
        f"MoE block: E={args.experts}, k={args.top_k}, d={args.d}, f={args.f}, {n} tokens, "
        f"float32, {jax.devices()[0].platform}; rows per expert {load_e.min()}..{load_e.max()}"
    )
    for name, value in seconds.items():
        print(f"  {name:18s} {value * 1e3:9.1f} ms  {value / n * 1e6:8.2f} us/token")
    ratio = seconds["dense"] / seconds["routed"]
    implied = args.experts / args.top_k
    print(f"  dense / routed     {ratio:9.2f}x   (routing implies E/k = {implied:.1f}x)")
    within = implied / 2 <= ratio <= implied * 2
    print(f"  within a factor of 2 of E/k: {'yes' if within else 'NO'}")


if __name__ == "__main__":
    main()
