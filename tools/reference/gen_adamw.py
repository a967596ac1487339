"""AdamW fixture: torch.optim.AdamW (single-tensor path) on a weight (decay 0.05) and a bias
(no decay) for three steps with given gradients and lr 1e-3, 2e-3, 3e-3.

Writes tests/fixtures/adamw/adamw.safetensors: w0..w3, b0..b3 (parameters after each step) and
gw0..gw2, gb0..gb2 (the gradients used).
"""
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "adamw", "adamw.safetensors")


def main():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 5, generator=g))
    b = torch.nn.Parameter(torch.randn(8, generator=g))
    out = {"w0": w.detach().clone(), "b0": b.detach().clone()}
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.05}, {"params": [b], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    for step in range(3):
        gw = torch.randn(8, 5, generator=g) * (10.0 ** (step - 1))
        gb = torch.randn(8, generator=g)
        out[f"gw{step}"], out[f"gb{step}"] = gw, gb
        for grp in opt.param_groups:
            grp["lr"] = 1e-3 * (step + 1)
        opt.zero_grad()
        ((w * gw).sum() + (b * gb).sum()).backward()
        opt.step()
        out[f"w{step + 1}"], out[f"b{step + 1}"] = w.detach().clone(), b.detach().clone()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, OUT)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
