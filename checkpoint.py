"""Training runs on disk (docs/method.md §6): the checkpoint that --resume continues from, the
start of a run (new, resumed, or from a policy file with --init), the log (metrics.csv, and
best.pt on a new best evaluation) and export of a policy.

A checkpoint holds everything to resume exactly: weights, optimiser, replay buffer, the ids of the
waiting states, the loop counters and both random generators; it is written atomically and reads
with torch.load(..., weights_only=True).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

import model
from replay import ReplayBuffer
from rl import SPREAD_KEYS, evaluate


def save_checkpoint(path: Path, net, mcfg, opt, loop: dict, buf, pool, rng, gen) -> None:
    """Everything to resume, written atomically; readable with weights_only=True."""
    config = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(mcfg).items()
    }
    ckpt = dict(
        config=config, state_dict=net.state_dict(), optimizer=opt.state_dict(),
        step=loop["step"], buffer=buf.state_dict(), pool=[s["sid"] for s in pool],
        next_id=loop["next_id"], np_rng=json.dumps(rng.bit_generator.state),
        torch_gen=gen.get_state(), best_score=loop["best_score"],
    )  # fmt: skip
    torch.save(ckpt, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def export(ckpt_path: str, out_path: str) -> None:
    """Write the policy (config + weights) of a checkpoint or policy file, as save_policy does."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    torch.save({"config": ckpt["config"], "state_dict": ckpt["state_dict"]}, out_path)
    net, _ = model.load_policy(out_path)  # fails loudly if the file is not a valid policy
    print(f"exported {ckpt_path} -> {out_path} params={sum(p.numel() for p in net.parameters())}")


def start(cfg, mcfg, run: Path, rng, gen) -> tuple:
    """Network, optimiser, buffer and loop state (step, next_id, pool ids, best score): new,
    resumed from run/ckpt.pt, or started from the policy file cfg.init."""
    net = model.PolicyNet(mcfg).to(cfg.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    buf = ReplayBuffer(cfg.capacity, cfg.alpha, cfg.eps, cfg.lag_cap, cfg.n_elites)
    loop = dict(step=0, next_id=0, pool=[], best_score=-np.inf)
    if cfg.resume and (run / "ckpt.pt").exists():
        ck = torch.load(run / "ckpt.pt", map_location=cfg.device, weights_only=True)
        has_fine = any(".fine." in k for k in ck["state_dict"])
        if has_fine != (cfg.fine_len > 0):
            raise ValueError(f"--resume {run / 'ckpt.pt'}: its network has "
                             f"{'a' if has_fine else 'no'} fine patch; run with --fine_len "
                             f"{'160' if has_fine else '0'}")  # fmt: skip
        net.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        for group in opt.param_groups:  # --lr applies to the resumed run (Adam's moments kept)
            group["lr"] = cfg.lr
        buf.load_state_dict(ck["buffer"])
        loop = {k: ck[k] for k in ("step", "next_id", "pool", "best_score")}
        rng.bit_generator.state = json.loads(ck["np_rng"])
        gen.set_state(ck["torch_gen"])
        print(f"resumed step={loop['step']} buf={len(buf)}")
    elif cfg.init:  # fine-tune: the weights of an exported policy of the same sizes
        init_net, init_cfg = model.load_policy(cfg.init, device=cfg.device)
        if init_cfg.fine_len == 0 and mcfg.fine_len > 0:  # starts as init_net, learns the bins
            try:
                init_net, init_cfg = model.upgrade(init_net, mcfg), mcfg
            except ValueError:
                pass  # reported below with both networks
        if init_cfg != mcfg:
            raise ValueError(f"--init {cfg.init}: its network {init_cfg} differs from {mcfg}")
        net.load_state_dict(init_net.state_dict())
        print(f"init={cfg.init}")
    return net, opt, buf, loop


METRICS = "step time_s reward best_loss adv_abs entropy beta n_replay buf it_s".split()


EVAL_KEYS = ["eval_win_train", "eval_gain_train", "eval_win_hold", "eval_gain_hold"] + SPREAD_KEYS


def log_step(last: dict, net, evals, rand_best, kinds, box, run: Path, loop: dict, mcfg, cfg):
    """Evaluate when due (best.pt on a new best score), print and append metrics.csv."""
    if last.get("do_eval"):
        for e, rb, kind in zip(evals, rand_best, kinds):
            tag = ("train", "hold")[kind - 1]
            win, gain, sp = evaluate(net, e, rb, box, cfg)
            last[f"eval_win_{tag}"], last[f"eval_gain_{tag}"] = win, gain
            if kind == 1:  # spread on the fixed trained-molecule states
                last.update(sp)
        value = np.mean([last[k] for k in EVAL_KEYS if "gain" in k and k in last])
        if value > loop["best_score"]:
            loop["best_score"] = float(value)
            model.save_policy(run / "best.pt", net, mcfg)
    if cfg.snap_every and last["step"] % cfg.snap_every == 0:
        (run / "snaps").mkdir(exist_ok=True)
        model.save_policy(run / "snaps" / f"step_{last['step']:07d}.pt", net, mcfg)
    last.pop("do_eval", None)
    if not cfg.quiet:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in last.items()), flush=True)  # fmt: skip
    new = not (run / "metrics.csv").exists()
    with open(run / "metrics.csv", "a", newline="") as fh:
        writer = csv.DictWriter(fh, METRICS + EVAL_KEYS)
        if new:
            writer.writeheader()
        writer.writerow(last)
