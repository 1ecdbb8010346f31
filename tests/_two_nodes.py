"""Run a command as 2 "nodes" × 1 process on this machine, the way a cluster runs it on 2 machines.

``python tests/_two_nodes.py CMD ...`` starts two torchrun agents (``python -m torch.distributed.run
--nnodes 2 --nproc-per-node 1 --node-rank {0,1}``, static rendezvous on 127.0.0.1, a free port, one
``--rdzv-id``), each running ``CMD`` as its node's only worker (``--no-python``), and exits with
the first non-zero exit code (0 when both succeed). Each worker sees what torchrun gives it on a
real node — ``RANK``, ``WORLD_SIZE=2``, ``LOCAL_RANK=0``, ``GROUP_RANK``, ``TORCHELASTIC_RUN_ID`` —
so Lightning's ``TorchElasticEnvironment`` and kdlab's run-directory logic see two nodes. It is
what ``srun`` does under SLURM (start the same command once per task), for tests and for trying a
multi-node setting on one machine: as a pipeline's ``hardware.launcher: [python, tests/_two_nodes.py]``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python tests/_two_nodes.py CMD [ARGS...]", file=sys.stderr)
        return 2
    port, job = free_port(), f"two-nodes-{uuid.uuid4().hex[:8]}"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                                f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
                                f"--rdzv-id={job}", "--no-python", *argv], env=dict(os.environ))
              for rank in (0, 1)]
    codes = [agent.wait() for agent in agents]
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
