"""Perturbation parallelism (DistZO2) against one process: MeZO step latency.

DistZO2 (Wang et al. 2025, arXiv 2507.03211, "Perturbation Parallelism"): the two
perturbed forwards of an SPSA step, L(theta + eps z) and L(theta - eps z), run at once on
two devices, which then exchange one scalar each. Here each rank stands for one device,
so each rank runs one thread. Compared, on a MiniLM-shaped encoder (the 6-layer
all-MiniLM-L6-v2 shape of benchmarks/zo_step.py, 22.6M parameters, random weights; batch
16 x 128; MeZO: two-sided, q = 1, Gaussian z, SGD):

* ``1 process, 1 thread`` (before): both forwards in turn, z regenerated three times;
* ``perturbation-parallel, 2 ranks x 1 thread`` (after): ``edgetrain.distributed``'s
  ``DataParallel(perturbation_parallel=True)``; rank 0 evaluates l+, rank 1 l-, each on
  the whole batch; z regenerated twice per rank (edgetrain.optim.zo: a move a rank does
  not evaluate after is folded into the next one);
* ``ablation: moves not folded``: the same pair with every move applied at once (as
  before moves were deferred: z regenerated three times per rank per step);
* ``data-parallel, 2 ranks x 1 thread``: today's data parallelism (each rank both
  forwards on half the batch), for reference;
* ``1 process, 2 threads``: the same two cores given to one process's intra-op threads.

Every configuration is a long-lived process (or pair) stepping the same run (same seeds,
same batches); a round times one step of each in turn (interleaved, one at a time), and
the medians over rounds and their ratios come from one run. A pair's step time is the
slower rank's. At the end the weights' digests say whether the perturbation-parallel
ranks and the 1-thread process hold bit-identical weights. The load average before and
after is printed (the machine's cores may be shared). Usage::

    python benchmarks/zo_perturbation_parallel.py [--rounds 9] [--shape minilm|small]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH, SEQ, VOCAB = 16, 128, 30522
N_EXAMPLES = BATCH * 1000  # the sampler's data size: only the shard bounds read it


def _model(shape: str):
    from zo_step import MiniLMShaped

    torch.manual_seed(0)  # the same random weights in every process
    if shape == "small":
        return MiniLMShaped(vocab=4096, dim=128, depth=2, heads=4).eval()
    return MiniLMShaped().eval()


def _batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)  # (B, T)
    return ids, torch.randint(0, 2, (BATCH,), generator=gen)


def _estimator(model):
    from edgetrain.estimators import build
    from edgetrain.recipe import Estimator, Optimizer, Recipe

    recipe = Recipe(
        estimator=Estimator(kind="zo", eps=1e-3, direction="gaussian"),
        optimizer=Optimizer(kind="sgd", lr=1e-6),
    )
    return build(model, recipe, seed=0)


def _unfold_moves() -> None:
    """Ablation, in this process: ZOSGD applies every move at once, as before moves were
    deferred (a rank that skips an evaluation still regenerates z three times a step)."""
    from edgetrain.optim.zo import ZOSGD

    deferred = ZOSGD._move

    def move_now(self, ctx, groups, seed, alpha) -> None:  # noqa: ANN001
        deferred(self, ctx, groups, seed, alpha)
        self._flush(ctx)

    ZOSGD._move = move_now


def _worker(conn, shape: str, threads: list[int], group: tuple | None, fold: bool = True) -> None:
    """A configuration's process: ``threads`` (one estimator per entry, 1 process) or one
    rank of ``group`` = (port, rank, world, perturbation_parallel). ``fold=False``: the
    ablation of ``_unfold_moves``."""
    torch.set_num_threads(1)
    from edgetrain import distributed as D

    if not fold:
        _unfold_moves()

    vocab = 4096 if shape == "small" else VOCAB
    dp = None
    if group is not None:
        port, rank, world, split = group
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        timeout = datetime.timedelta(seconds=600)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        models = [_model(shape)]
        ests = [_estimator(models[0])]
        dp = D.DataParallel(ests[0], N_EXAMPLES, BATCH, perturbation_parallel=split)
    else:
        models = [_model(shape) for _ in threads]
        ests = [_estimator(m) for m in models]
    conn.send(("ready", sum(p.numel() for p in models[0].parameters())))
    step = 0
    while True:
        command = conn.recv()
        if command[0] == "stop":
            break
        if command[0] == "digest":
            conn.send([D.weights_digest(m) for m in models])
            continue
        out = []
        batch = _batch(step, vocab)
        for i, est in enumerate(ests):
            torch.set_num_threads(threads[i] if group is None else 1)
            local = batch if dp is None else dp.shard(batch, step)
            start = time.perf_counter()
            est.step(local)
            out.append(time.perf_counter() - start)
        step += 1
        conn.send((out, time.process_time()))  # and this process's CPU seconds so far
    if dp is not None:
        dp.finish()
        dp.close()
        dist.destroy_process_group()


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1, help="rounds untimed (>= 1)")
    parser.add_argument("--shape", choices=("minilm", "small"), default="minilm")
    args = parser.parse_args()
    load_before = os.getloadavg()
    ctx = mp.get_context("spawn")
    workers: dict[str, list] = {}
    stores, procs = [], []

    def start(
        name: str, threads: list[int], world: int = 0, split: bool = False, fold: bool = True
    ) -> None:
        conns = []
        if world:
            store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
            stores.append(store)
            groups = [(store.port, r, world, split) for r in range(world)]
        else:
            groups = [None]
        for group in groups:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, args.shape, threads, group, fold))
            proc.start()
            procs.append(proc)
            conns.append(parent)
        workers[name] = conns

    start("single", [1, 2])  # one process: an estimator stepped on 1 thread, one on 2
    start("perturbation", [1], world=2, split=True)
    start("unfolded", [1], world=2, split=True, fold=False)
    start("data", [1], world=2, split=False)
    n_params = 0
    for conns in workers.values():
        for conn in conns:
            _, n_params = conn.recv()
    names = {
        "1 process, 1 thread": ("single", 0),
        "perturbation-parallel, 2 ranks x 1 thread": ("perturbation", 0),
        "ablation: perturbation-parallel, moves not folded": ("unfolded", 0),
        "data-parallel, 2 ranks x 1 thread": ("data", 0),
        "1 process, 2 threads": ("single", 1),
    }
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[tuple[str, int], list[float]] = {}  # each worker's CPU seconds, by round
    busy_start = wall_start = 0.0
    for r in range(args.warmup + args.rounds):
        if r == args.warmup:
            busy_start, wall_start = _busy_seconds(), time.monotonic()
        for key in workers:  # one configuration at a time
            for conn in workers[key]:
                conn.send(("step",))
            replies = [conn.recv() for conn in workers[key]]
            for rank, (_, seconds) in enumerate(replies):
                cpu.setdefault((key, rank), []).append(seconds)
            if r < args.warmup:
                continue
            for name, (owner, index) in names.items():
                if owner == key:
                    times[name].append(max(reply[0][index] for reply in replies))
    wall = time.monotonic() - wall_start
    busy = (_busy_seconds() - busy_start) / wall
    first = args.warmup - 1  # the CPU counters at the end of the warm-up
    ours = sum(v[-1] - v[first] for v in cpu.values()) / wall
    digests = {}
    for key, conns in workers.items():
        for rank, conn in enumerate(conns):
            conn.send(("digest",))
            digests[key, rank] = conn.recv()
    for conns in workers.values():
        for conn in conns:
            conn.send(("stop",))
    for proc in procs:
        proc.join()
    load_after = os.getloadavg()

    med = {name: statistics.median(values) for name, values in times.items()}
    base1, base2 = med["1 process, 1 thread"], med["1 process, 2 threads"]
    print(
        f"MeZO step, {args.shape} ({n_params / 1e6:.1f}M parameters), batch {BATCH} x {SEQ}; "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up; torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}\n")
    print(
        f"CPU busy over the timed rounds: {busy:.2f} cores on average, {ours:.2f} of them "
        f"this benchmark's processes, so {max(0.0, busy - ours):.2f} cores of other load\n"
    )
    print(
        "| configuration | median s/step | min | max | vs 1 process 1 thread "
        "| vs 1 process 2 threads |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, values in times.items():
        print(
            f"| {name} | {med[name]:.3f} | {min(values):.3f} | {max(values):.3f} | "
            f"{med[name] / base1:.3f}x | {med[name] / base2:.3f}x |"
        )
    single1, single2 = digests["single", 0]
    pp = [digests[key, r][0] for key in ("perturbation", "unfolded") for r in range(2)]
    print(
        f"\nweights after {args.warmup + args.rounds} steps: perturbation-parallel ranks "
        f"(both variants) {'==' if set(pp) == {single1} else '!='} 1 process 1 thread "
        f"(digests {', '.join(f'{d:016x}' for d in pp)}; {single1:016x}); 1 process 2 threads "
        f"{'==' if single2 == single1 else '!='} 1 thread"
    )


if __name__ == "__main__":
    main()
