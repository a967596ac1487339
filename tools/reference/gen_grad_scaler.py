"""GradScaler fixture: torch.amp.GradScaler's dynamic loss scaling (the CPU instance of the same
class and update rule as torch.cuda.amp.GradScaler: `_amp_foreach_non_finite_check_and_unscale_`
then `_amp_update_scale_`) over sequences of steps whose gradients are finite, contain inf / -inf /
nan, or come from a non-finite loss.

Each step: zero the gradients, backward `scaler.scale(loss)` with
`loss = sum(w * gw) + sum(b * gb)` (gw, gb drawn from a seeded generator; one element replaced by
inf / -inf / nan for the bad kinds, or the whole loss multiplied by nan / inf for `nan_loss` /
`inf_loss`; the injected positions are fixed: gw[1,2] = inf, gb[0] = -inf, gw[3,0] = nan),
`scaler.step(SGD)`, `scaler.update()`. Recorded per step: the kind, the finite gradients gw
(row-major) and gb before injection, the scale used for the backward, the scale and growth
tracker after `update()`, and whether the optimizer step was skipped (parameters unchanged). Sequences use a small growth_interval so growth is exercised;
one starts at 2^127 so a growth to inf is refused (the tracker still resets).

Writes tests/fixtures/grad_scaler/grad_scaler.json (torch only; runs on CPU).
"""
import json
import math
import os

import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "grad_scaler", "grad_scaler.json")

SEQUENCES = [
    {
        "name": "growth_backoff_interval3",
        "init_scale": 2.0**16,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 3,
        "kinds": ["finite", "finite", "finite", "finite", "inf", "finite", "finite", "nan", "finite",
                  "finite", "finite", "finite", "finite", "finite", "-inf", "nan_loss", "finite",
                  "finite", "inf_loss", "finite", "finite", "finite", "finite"],
    },
    {
        "name": "long_overflow_run",
        "init_scale": 2.0**16,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 4,
        "kinds": ["nan"] * 18 + ["finite"] * 9 + ["nan_loss"] * 3 + ["finite"] * 4,
    },
    {
        "name": "growth_to_inf_refused",
        "init_scale": 2.0**127,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2,
        # Small gradients, so that 2^127 x gradient stays finite in fp32 and only the growth to
        # 2^128 (inf) is what the rule refuses.
        "grad_mult": 1e-3,
        "kinds": ["finite", "finite", "finite", "finite", "inf", "finite", "finite", "finite"],
    },
    {
        "name": "factors_4_and_0.25",
        "init_scale": 1024.0,
        "growth_factor": 4.0,
        "backoff_factor": 0.25,
        "growth_interval": 2,
        "kinds": ["finite", "finite", "nan", "finite", "finite", "finite", "inf", "inf", "finite"],
    },
]


def run(seq, gen):
    w = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    b = torch.nn.Parameter(torch.randn(3, generator=gen))
    opt = torch.optim.SGD([w, b], lr=0.1)
    scaler = torch.amp.GradScaler(
        "cpu",
        init_scale=seq["init_scale"],
        growth_factor=seq["growth_factor"],
        backoff_factor=seq["backoff_factor"],
        growth_interval=seq["growth_interval"],
    )
    steps = []
    for kind in seq["kinds"]:
        gw = torch.randn(4, 3, generator=gen) * seq.get("grad_mult", 1.0)
        gb = torch.randn(3, generator=gen) * seq.get("grad_mult", 1.0)
        finite_grads = {"gw": gw.flatten().tolist(), "gb": gb.tolist()}
        if kind == "inf":
            gw[1, 2] = math.inf
        elif kind == "-inf":
            gb[0] = -math.inf
        elif kind == "nan":
            gw[3, 0] = math.nan
        opt.zero_grad()
        loss = (w * gw).sum() + (b * gb).sum()
        if kind == "nan_loss":
            loss = loss * math.nan
        elif kind == "inf_loss":
            loss = loss * math.inf
        scale_used = scaler.get_scale()
        scaler.scale(loss).backward()
        before = [w.detach().clone(), b.detach().clone()]
        scaler.step(opt)
        scaler.update()
        skipped = torch.equal(before[0], w.detach()) and torch.equal(before[1], b.detach())
        steps.append({
            "kind": kind,
            **finite_grads,
            "scale_used": scale_used,
            "scale_after": scaler.get_scale(),
            "growth_tracker_after": int(scaler._growth_tracker.item()),
            "skipped": bool(skipped),
        })
    return steps


def main():
    gen = torch.Generator().manual_seed(0)
    out = {
        "torch": torch.__version__,
        "note": "torch.amp.GradScaler('cpu', ...) with SGD; written by tools/reference/gen_grad_scaler.py",
        "sequences": [],
    }
    for seq in SEQUENCES:
        meta = {k: v for k, v in seq.items() if k not in ("kinds", "grad_mult")}
        out["sequences"].append(meta | {"steps": run(seq, gen)})
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
