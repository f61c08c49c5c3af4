"""A/B on the GPU: 8-bit optimizer steps with the sign rules as rank comparisons or as a table gather.

For sorted qmaps (the dynamic maps) ``_requantize`` applies the signed/unsigned rounding rules by
comparing the rank with bounds stored in the search tables (``_RULE_WORD``); clearing that flag in
the cached tables makes the same kernel gather the codes from the uint8 table instead. Per
optimizer (AdamW8bit, Lion8bit, SGD8bit with momentum; 16 x 4096x16384 float32 parameters) this
checks that one step from the same state is bit-identical both ways, then times a step both ways
(``triton.testing.do_bench``, median; the better of two rounds each) against the copy bandwidth.

    python tests/gpu/ab_optim_sign_rules.py
"""

from __future__ import annotations

import torch
import triton.testing
from check_quant_kernels import copy_bandwidth  # tests/gpu/ (the script's folder is on sys.path)

import tritonbits as bnb
from tritonbits.backends.triton import optim as kernels


def _set_rule(flags: dict, on: bool) -> None:
    """Set (``on``: to the value built) or clear the rule flag of every cached search table."""
    for key, hit in kernels._TABLE_CACHE.items():
        hit[2][1][kernels.SPARE_WORD] = flags[key] if on else 0


def _snapshot(params, optimizer) -> tuple:
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()} for p in params}
    return [p.detach().clone() for p in params], state


def _restore(params, optimizer, snapshot) -> None:
    values, state = snapshot
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    for p in params:
        for k, v in state[p].items():
            if k.startswith("qmap"):
                continue  # shared maps: a copy would bump their version and rebuild the tables
            if torch.is_tensor(v):
                optimizer.state[p][k].copy_(v)
            else:
                optimizer.state[p][k] = v


def _outcome(params, optimizer) -> list:
    return [p.detach().clone() for p in params] + [
        v.clone() for p in params for k, v in optimizer.state[p].items() if torch.is_tensor(v) and "qmap" not in k
    ]


def main() -> None:
    bandwidth = copy_bandwidth()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4096, 16384, device="cuda") * 0.02) for _ in range(16)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    cases = [
        ("adamw8bit", lambda: bnb.optim.AdamW8bit(params, lr=1e-4), 16),
        ("lion8bit", lambda: bnb.optim.Lion8bit(params), 14),
        ("sgd8bit", lambda: bnb.optim.SGD8bit(params, lr=1e-3, momentum=0.9), 14),
    ]
    for name, make, bytes_per_param in cases:
        kernels._TABLE_CACHE.clear()
        optimizer = make()
        for _ in range(3):
            optimizer.step()
        torch.cuda.synchronize()
        flags = {key: int(hit[2][1][kernels.SPARE_WORD]) for key, hit in kernels._TABLE_CACHE.items()}
        start = _snapshot(params, optimizer)
        outcomes = []
        for on in (True, False):
            _restore(params, optimizer, start)
            _set_rule(flags, on)
            optimizer.step()
            outcomes.append(_outcome(params, optimizer))
        identical = all(torch.equal(a, b) for a, b in zip(*outcomes))
        times: dict = {True: [], False: []}
        for on in (True, False, True, False):
            _set_rule(flags, on)
            times[on].append(triton.testing.do_bench(optimizer.step, warmup=25, rep=300, return_mode="median"))
        assert set(flags) == set(kernels._TABLE_CACHE), "the search tables were rebuilt while timing"
        for on in (True, False):
            ms = min(times[on])
            print(f"{name} sign rules {'compared' if on else 'gathered'}: {ms:.3f} ms, "
                  f"{bytes_per_param * n / (ms * 1e-3) / bandwidth:.1%} of copy ({bandwidth / 1e9:.0f} GB/s), "
                  f"rule flags {list(flags.values())}, identical {identical}", flush=True)  # fmt: skip
        del optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
