"""The MoE forward's time per token: routed dispatch against every expert on every token.

Run (about a minute on a 2-core CPU; prints the numbers, writes nothing):
  PYTHONPATH=$PWD python bench/moe_dispatch.py

One sparse MoE block (16 experts, top-2, d=256, f=1024, SiLU-gated experts, Mixtral routing) on
4096 tokens, float32, jitted and warm, the median of several runs. "routed" is
`jaxlens.models.moe.RoutedExperts` as the decoder runs it (dispatch "auto": on CPU the blocked
grouped matmul); "dense" computes all E experts for every token and weights their outputs by the
routing (zero for the experts not chosen), the same numbers at E/k times the matmul work.
"ragged_dot on CPU" is the same sorted dispatch with `jax.lax.ragged_dot`, whose CPU lowering
masks a dense product, to show why the CPU path exists. The outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.models import moe


def _dense_block(params, x_btd, spec: moe.MoESpec):
    """Every expert on every token, combined by the routing weights (zero where not chosen)."""
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    weights_nk, experts_nk = moe.route(
        x_nd @ params["gate"]["kernel"], spec.top_k, spec.normalise_top_k
    )
    weights_ne = jnp.zeros((b * t, spec.num_experts), x_nd.dtype)
    weights_ne = weights_ne.at[jnp.arange(b * t)[:, None], experts_nk].set(weights_nk)
    bank = params["experts"]
    gate_name, up_name, down_name = spec.projections
    hidden_enf = jax.nn.silu(jnp.einsum("nd,edf->enf", x_nd, bank[gate_name]))
    hidden_enf = hidden_enf * jnp.einsum("nd,edf->enf", x_nd, bank[up_name])
    y_end = jnp.einsum("enf,efd->end", hidden_enf, bank[down_name])
    return jnp.einsum("ne,end->nd", weights_ne, y_end).reshape(b, t, d)


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--f", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
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
    want = np.asarray(dense(params, x_btd))
    for fn in (routed, ragged):
        np.testing.assert_allclose(fn({"params": params}, x_btd), want, atol=1e-4, rtol=1e-4)
    _, experts_nk = moe.route(
        x_btd.reshape(-1, args.d) @ params["gate"]["kernel"], spec.top_k, True
    )
    load_e = np.bincount(np.asarray(experts_nk).ravel(), minlength=args.experts)

    n = x_btd.shape[0] * x_btd.shape[1]
    seconds = {
        "routed": _median_seconds(routed, {"params": params}, x_btd, repeats=args.repeats),
        "dense": _median_seconds(dense, params, x_btd, repeats=args.repeats),
        "ragged_dot on CPU": _median_seconds(ragged, {"params": params}, x_btd, repeats=1),
    }
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
