"""Train the Spectuner-D1 policy: one-step REINFORCE with a prioritized replay buffer (method §6).
"method §N" is a section of docs/method.md, which states every term.

An episode is one step: a state s is (observed windows, target molecule, states.py), an action
u ~ pi(.|s) a point of the unit cube of the five LTE parameters, the reward -loss(u; s) of the
fit's own problem.Problem. Per state K actions are drawn (a share explore_frac uniform); rewards
are rank-shaped, standardised per state with a leave-one-out baseline, and a state's best-known
action (stored best, truth, or data/real_best.json for real windows) joins its set (rl.py). The
buffer (replay.py) replays states by their lag behind that best and keeps distinct elites, whose
imitation keeps the policy on every good basin. States (ids) come from --workers processes.
SIGTERM or Ctrl-C checkpoints at the end of the step (checkpoint.py); --resume is exact.

    python train.py train --run_dir runs/main
    python train.py train --run_dir runs/main --resume
    python train.py train --run_dir runs/no_per --no-per
    python train.py export runs/main/best.pt data/policy.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import model
import rl
import spectuner
import state_server
import states
from checkpoint import EVAL_KEYS, METRICS, export, log_step, save_checkpoint, start  # noqa: F401
from states import HOLDOUT, REAL_HOLDOUT, TRAIN_MOLECULES


@dataclasses.dataclass
class Config:
    command: str = "train"  # train; export (CKPT OUT: checkpoint -> policy file); real_best
    # (OUT: a global search on the real training windows, the known answer of real states)
    paths: list[str] = dataclasses.field(default_factory=list)  # export: CKPT OUT
    run_dir: str = "runs/main"  # checkpoints, metrics.csv, config.json, best.pt
    resume: bool = False  # continue from run_dir/ckpt.pt
    init: str = ""  # a policy file (e.g. data/policy.pt) whose weights start a new run; "" = none
    seed: int = 0  # seeds numpy, torch and every state
    device: str = "cpu"  # cpu or cuda[:N] (never required; an error if torch sees no GPU)
    threads: int = 1  # torch CPU threads
    workers: int = 0  # processes that make states and evaluate losses (0 = this one); results
    # do not depend on it
    n_steps: int = 300000  # gradient steps (total, counting resumed ones)
    batch_states: int = 16  # states per step
    k_samples: int = 16  # K actions per state
    lr: float = 3e-4  # Adam learning rate (also on --resume: lower it to settle a plateau)
    grad_clip: float = 1.0  # max gradient norm
    ent_coef: float = 0.03  # entropy bonus weight, 0 = off
    shaping: str = "rank"  # reward shaping before standardisation: rank (utilities) or raw
    resolution: float = 0.1  # rank shaping: rewards rounded to this, in units of the loss scale
    loss: str = "pm"  # pm (peak matching) or chi2
    per: bool = True  # prioritized replay; --no-per: fresh states only (ablation)
    use_truth: bool = True  # a synthetic state's true parameters join its first K set
    replay_frac: float = 0.5  # fraction of a step's states drawn from the buffer
    capacity: int = 4096  # buffer size (states), FIFO
    alpha: float = 0.6  # PER priority exponent
    beta0: float = 0.4  # PER importance exponent at step 0, annealed to 1
    beta_steps: int = 50000  # steps over which beta reaches 1
    eps: float = 1e-3  # PER priority floor, added by ReplayBuffer.update
    lag_cap: float = 10.0  # PER: a replayed state's relative lag is capped here before eps
    explore_frac: float = 0.25  # share of each state's K samples drawn uniformly over the cube
    n_elites: int = 4  # distinct good actions kept per buffered state and imitated (0 = off)
    elite_dist: float = 0.1  # elites differ by more than this in some unit-cube coordinate
    elite_tol: float = 0.05  # and lag the state's best by at most this (relative, as the lag)
    imit_coef: float = 1.0  # weight of the elite imitation term (imitation_loss)
    molecules: list[str] = dataclasses.field(default_factory=lambda: list(TRAIN_MOLECULES))
    # target molecules of the synthetic training states (states.TRAIN_MOLECULES)
    holdout: list[str] = dataclasses.field(default_factory=lambda: list(HOLDOUT))  # molecules
    # of the held-out evaluation set, never trained on
    catalog: str = "../shared/data/catalogs"  # folder of .cat files; CH3OH is bundled
    real_dir: str = "../shared/data/spectra/iras16293b"  # real windows; "" = none
    real_frac: float = 0.15  # fraction of fresh states from the real spectra
    real_best: str = "data/real_best.json"  # known CH3OH answer of real states ("" = none)
    real_holdout: list[str] = dataclasses.field(default_factory=lambda: list(REAL_HOLDOUT))
    # spw numbers of the real windows never trained on (evaluate.py's real group fits them)
    forest_frac: float = 0.7  # fraction of the other fresh states from forest.py line forests
    forest_preset: str = "hot_corino"  # forest.PRESETS key of those states
    v_lsr: float = 2.7  # real spectra: systemic velocity [km/s]
    freq_lo_MHz: float = 80e3  # synthetic windows lie between these rest frequencies [MHz]
    freq_hi_MHz: float = 370e3  # (upper limit)
    max_windows: int = 3  # 1..max_windows windows per synthetic state
    width_MHz: list[float] = dataclasses.field(default_factory=lambda: [100.0, 500.0])  # window
    chan_kms: list[float] = dataclasses.field(default_factory=lambda: [0.1, 2.0])  # channel width
    max_chan: int = 4000  # channels per window at most (narrower window if needed)
    rms_K: list[float] = dataclasses.field(default_factory=lambda: [0.02, 0.5])  # noise range
    T_bg_max: float = 30.0  # continuum under the lines, uniform 0..T_bg_max in half the states [K]
    max_others: int = 4  # other molecules on top, 0..max_others
    p_absent: float = 0.1  # fraction of synthetic states without the target
    pool_size: int = 64  # fresh states waiting, binned by peak count
    fixed_states: int = 0  # >0: cycle through this many states only (toy problems, tests)
    d_model: int = 128  # policy width (ModelConfig)
    n_layers: int = 3  # transformer blocks
    max_tokens: int = 64  # transition tokens per molecule
    fine_len: int = 160  # fine patch bins (ModelConfig); 0 = none, as in policies before it
    hidden: int = 128  # flow conditioner width
    n_eval: int = 32  # evaluation states per set (trained molecules, held-out ones)
    eval_every: int = 250  # steps between evaluations (0 = never)
    snap_every: int = 0  # steps between policy snapshots run_dir/snaps/step_N.pt, for choosing
    # the shipped policy by evaluate.py (0 = none)
    ckpt_every: int = 1000  # steps between checkpoints
    ckpt_minutes: float = 5.0  # and at least this often [min]
    log_every: int = 20  # steps between log lines
    quiet: bool = False  # no log lines


GROUP_EDGES = np.array([1, 4, 16, 64])  # peak-count groups: 0, 1-3, 4-15, 16-63, 64+


def check_config(cfg: Config) -> None:
    """Reject options that cannot work, before anything is loaded (ValueError)."""
    if cfg.command != "train" or cfg.loss not in spectuner.LOSSES or cfg.shaping not in rl.SHAPING:
        raise ValueError(
            f"command {cfg.command!r} / loss {cfg.loss!r} / shaping {cfg.shaping!r}: expected "
            f"train|export|real_best / {sorted(spectuner.LOSSES)} / {sorted(rl.SHAPING)}"
        )
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r}: torch sees no CUDA device; use --device cpu")
    if not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ValueError(f"device {cfg.device!r}: expected cpu or cuda[:N]")
    if not 0.0 <= cfg.explore_frac < 1.0:
        raise ValueError(f"explore_frac {cfg.explore_frac}: expected 0 <= value < 1")
    if cfg.workers < 0:
        raise ValueError(f"workers {cfg.workers}: expected 0 (this process) or more")
    folders = (
        ("catalog", cfg.catalog, "the .cat files of the training molecules"),
        ("real_dir", cfg.real_dir, "the real windows (windows.csv, spw*.dat)"),
    )
    for name, path, what in folders:
        if path and not Path(path).is_dir():
            raise ValueError(f"--{name} {path}: no such folder; it should hold {what} (the "
                             f"project's shared data, see data/README.md), or pass --{name} '' "
                             "to train without it")  # fmt: skip
    if cfg.n_elites < 0 or cfg.imit_coef < 0:
        raise ValueError(f"n_elites {cfg.n_elites} / imit_coef {cfg.imit_coef}: expected >= 0")


def model_config(cfg: Config) -> model.ModelConfig:
    return model.ModelConfig(
        d_model=cfg.d_model, n_layers=cfg.n_layers, ff_hidden=2 * cfg.d_model,
        max_tokens=cfg.max_tokens, hidden_features=(cfg.hidden, cfg.hidden),
        fine_len=cfg.fine_len,
    )  # fmt: skip


def eval_sets(ctx: dict, cfg: Config) -> tuple:
    """Fixed evaluation states (trained, held-out molecules), the best of 50 uniform draws on
    each, and their kinds (1, 2)."""
    kinds = [k for k, s in ((1, "train"), (2, "hold")) if cfg.eval_every and ctx[s]]
    evals = [[states.make_state(i, kind, ctx, cfg) for i in range(cfg.n_eval)] for kind in kinds]
    rand_best = [np.array([s["problem"](np.random.default_rng([cfg.seed, 9, i]).random((50, 5)))
                           .min() for i, s in enumerate(e)]) for e in evals]  # fmt: skip
    return evals, rand_best, kinds


def draw_batch(pool: list, buf, server, loop: dict, beta: float, rng, cfg: Config) -> tuple:
    """A step's states: fresh ones from the pool (a peak-count group uniformly, then a member;
    pixel binning, method §6), each replaced by a new state, then replayed ones from the buffer.
    Returns (states, replay slots, importance weights)."""
    n_rep = min(int(round(cfg.replay_frac * cfg.batch_states)), len(buf)) if cfg.per else 0
    chosen = []
    for _ in range(cfg.batch_states - n_rep):
        groups = np.searchsorted(GROUP_EDGES, [s["n_peaks"] for s in pool], side="right")
        g = rng.choice(np.unique(groups))
        chosen.append(pool.pop(int(rng.choice(np.flatnonzero(groups == g)))))
        pool.extend(server.make([new_id(loop, cfg)]))
    rep_idx, w_is = buf.sample(n_rep, beta, rng) if n_rep else (np.zeros(0, int), np.ones(0))
    return chosen + server.make(buf.ids[rep_idx]), rep_idx, w_is


def new_id(loop: dict, cfg: Config) -> int:
    """The next fresh state id (cycling over cfg.fixed_states when set)."""
    loop["next_id"] += 1
    sid = loop["next_id"] - 1
    return sid % cfg.fixed_states if cfg.fixed_states else sid


def other_command(cfg: Config) -> None:
    """`export CKPT OUT` or `real_best OUT`."""
    want = {"export": 2, "real_best": 1}[cfg.command]
    if len(cfg.paths) != want:
        raise ValueError(f"{cfg.command} needs {('OUT', 'CKPT OUT')[want - 1]}, got {cfg.paths}")
    export(*cfg.paths) if cfg.command == "export" else states.real_best(cfg, cfg.paths[0])


def seeded_run(cfg: Config) -> tuple:
    """The run folder (config.json written), the seeded generators and the ModelConfig."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    return run, rng, gen, model_config(cfg)


def main(cfg: Config) -> dict:
    """Train (or export, or real_best); returns the last logged metrics."""
    if cfg.command in ("export", "real_best"):
        return other_command(cfg) or {}
    check_config(cfg)
    # --- seed and device ---
    run, rng, gen, mcfg = seeded_run(cfg)
    # --- data: molecules, real windows, evaluation states, the state server (§6) ---
    ctx = states.build_context(cfg, mcfg)
    evals, rand_best, kinds = eval_sets(ctx, cfg)
    # --- model, optimiser, buffer ---
    net, opt, buf, loop = start(cfg, mcfg, run, rng, gen)
    server = state_server.StateServer(ctx, cfg)
    pool = server.make(loop["pool"])
    pool += server.make([new_id(loop, cfg) for _ in range(cfg.pool_size - len(pool))])
    # --- loop ---
    K, t0, t_ckpt, step0, last = cfg.k_samples, time.time(), time.time(), loop["step"], {}
    n_uni = int(round(cfg.explore_frac * K))
    try:
        while loop["step"] < cfg.n_steps:
            step = loop["step"]
            beta = min(1.0, cfg.beta0 + (1.0 - cfg.beta0) * step / max(1, cfg.beta_steps))
            batch_states, rep_idx, w_is = draw_batch(pool, buf, server, loop, beta, rng, cfg)
            n_fresh = len(batch_states) - len(rep_idx)
            batch = model.collate([s["tokens"] for s in batch_states], cfg.device)
            u = rl.draw_actions(net, batch, K, n_uni, gen)  # (K, B, 5): policy, then uniform
            losses, u_all, l_all = rl.score(batch_states, u, buf, rep_idx, n_fresh, server, cfg)
            server.drop([s["sid"] for s in batch_states])
            adv = rl.advantages(l_all, batch_states, cfg)  # (K+1, B)
            # --- REINFORCE step (method §6; the equations in reinforce_loss) ---
            weights = np.concatenate([np.ones(n_fresh), w_is])  # importance weights (1 if fresh)
            weights = weights / np.isfinite(l_all).sum(0)  # per member present
            elites = rl.stored_elites(buf, rep_idx, w_is, n_fresh, cfg)
            logp = rl.reinforce_step(net, opt, batch, u_all, adv, weights, n_uni, cfg, elites)
            loop["step"] = step = step + 1
            # --- buffer, log, evaluate, checkpoint ---
            pol_best = rl.update_buffer(buf, batch_states, rep_idx, losses, u_all, l_all, K - n_uni,
                                     cfg)  # fmt: skip
            do_eval = bool(cfg.eval_every and step % cfg.eval_every == 0 and evals)
            snap = bool(cfg.snap_every and step % cfg.snap_every == 0)
            if step % cfg.log_every == 0 or step == cfg.n_steps or do_eval or snap:
                el = time.time() - t0
                last = dict(step=step, time_s=round(el, 1), reward=float(-losses.mean()),
                            best_loss=float(pol_best.mean()), adv_abs=float(np.abs(adv).mean()),
                            entropy=float(-logp[: K - n_uni].detach().mean()),
                            beta=round(beta, 4), n_replay=len(rep_idx), buf=len(buf),
                            it_s=round((step - step0) / max(el, 1e-9), 3))  # fmt: skip
                last["do_eval"] = do_eval
                log_step(last, net, evals, rand_best, kinds, ctx["box"], run, loop, mcfg, cfg)
            due = time.time() - t_ckpt > 60 * cfg.ckpt_minutes
            if step % cfg.ckpt_every == 0 or step == cfg.n_steps or due or STOP.is_set():
                save_checkpoint(run / "ckpt.pt", net, mcfg, opt, loop, buf, pool, rng, gen)
                t_ckpt = time.time()
            if STOP.is_set():  # SIGTERM or Ctrl-C: stopped at a step boundary, checkpointed
                print(f"stopped step={step} ckpt={run / 'ckpt.pt'} (continue with --resume)")
                break
    finally:
        server.close()
    return last


def config_parser(cls, positional=(), options=None, **parser_kw) -> argparse.ArgumentParser:
    """An argparse parser made from a Config dataclass (the same helper is in every script).

    One argument per field: the type from the annotation or the default, bools as --name /
    --no-name flags, lists as nargs="+", the help from the field's trailing comment and its
    continuation comment lines, then the default. Fields in `positional` are positional (lists
    take any number of words); `options` adds argparse keywords per field (choices, required).
    """
    helps, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"    (\w+):[^#]*?(?:#\s*(.*))?$", line)
        more = re.match(r"\s*#\s*(.*)$", line)
        if more and last:
            helps[last] += " " + more[1]
        elif field and not line.lstrip().startswith(("@", "class", "def")):
            last, helps[field[1]] = field[1], field[2] or ""
    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter,
                                     **parser_kw)  # fmt: skip
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        kind = dict(type=types.get(name, type(default)))
        if isinstance(default, bool):
            kind = dict(action=argparse.BooleanOptionalAction)
        elif isinstance(default, list):
            elem = type(default[0]) if default else next(
                (t for k, t in types.items() if f"[{k}]" in str(f.type)), str)  # fmt: skip
            kind = dict(type=elem, nargs="*" if f.name in positional else "+")
        elif f.name in positional:
            kind["nargs"] = "?"
        kind.update((options or {}).get(f.name, {}))
        text = helps.get(f.name, "").replace("%", "%%")
        if f.name in positional:
            parser.add_argument(f.name, default=default, help=text, **kind)
        else:
            shown = " ".join(map(str, default)) or "none" if isinstance(default, list) else \
                repr(default) if default == "" else default  # fmt: skip
            text += "" if kind.get("required") else f" (default: {shown})"
            parser.add_argument(f"--{f.name}", default=default, help=text, **kind)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """Config from the command line (config_parser)."""
    commands = dict(command=dict(choices=("train", "export", "real_best")))
    parser = config_parser(Config, ("command", "paths"), commands, description=__doc__)
    return Config(**vars(parser.parse_args(argv)))


STOP = threading.Event()  # set by SIGTERM / Ctrl-C on the command line: stop after this step


def _on_signal(signum, frame) -> None:
    """First SIGTERM or Ctrl-C: finish the step, checkpoint, stop. A second one: stop now."""
    if STOP.is_set():
        raise KeyboardInterrupt
    STOP.set()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        main(parse_config())
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
