"""The collectives role over torch.distributed with gloo, in two real processes."""
import multiprocessing as mp
import socket

import torch

import hal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out) -> None:
    platform = hal.get_platform("cpu")
    entry, _ = hal.select("collectives", platform, "torch_distributed")
    coll = entry.factory(backend=platform.dist_backend, world_size=2, rank=rank,
                         init_method=f"tcp://127.0.0.1:{port}")
    reduced = coll.all_reduce(torch.tensor([rank + 1.0, 10.0 * rank]))
    gathered = coll.all_gather(torch.full((2,), float(rank)), dim=0)
    obj = coll.broadcast_object({"batch": [1, 2, 3]} if rank == 0 else None, src=0)
    coll.barrier()
    out.put((rank, reduced.tolist(), gathered.tolist(), obj))
    coll.shutdown()


def test_gloo_all_reduce_all_gather_broadcast():
    assert hal.get_platform("cpu").dist_backend == "gloo"
    ctx = mp.get_context("spawn")
    port, out = _free_port(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank, reduced, gathered, obj in results:
        assert reduced == [3.0, 10.0]
        assert gathered == [0.0, 0.0, 1.0, 1.0]
        assert obj == {"batch": [1, 2, 3]}
