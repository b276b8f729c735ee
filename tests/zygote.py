"""Test helper: a Python with torch, DeepSpeed and infinitrain already imported that forks one real
``infinitrain train`` process per request (imports are ~85% of a tiny run's CPU time; the fault suite starts
dozens of runs that SIGKILL themselves).

Protocol: one JSON object per line on stdin {"argv", "env", "cwd", "stdout", "stderr", "fsize"}; the reply line
is {"pid"} as soon as the child runs (several may run at once: the ranks of one job), and when it ends its exit
code (negative: killed by that signal) is written to the file ``<stderr>.code``. The child is a fresh process as
far as the run is concerned: its own environment, argv, files and RLIMIT_FSIZE (SIGXFSZ is ignored, as Python
does, so an over-limit write raises EFBIG).
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import sys
import time
import traceback

PROTOCOL = os.fdopen(os.dup(1), "w")  # replies only; whatever the imports print goes to stderr
os.dup2(2, 1)

import deepspeed  # noqa: E402, F401
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: E402, F401  (DeepSpeed imports it when it checks optimizers)
import torch  # noqa: E402

import infinitrain.cli  # noqa: E402, F401
import infinitrain.train.loop  # noqa: E402, F401
from infinitrain.cli import train_main as main  # noqa: E402

torch.set_num_threads(1)


def child(req: dict) -> int:
    PROTOCOL.close()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if req.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
    try:
        main(req["argv"])
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 (a crash is reported like Python's own: traceback, exit 1)
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    """Single-threaded (fork with no other thread): read requests, fork, reap finished children."""
    children: dict[int, str] = {}
    buf, stdin_open = b"", True
    while stdin_open or children:
        ready = select.select([0], [], [], 0.02)[0] if stdin_open else time.sleep(0.02)
        if ready:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    os._exit(child(request))
                children[pid] = request["stderr"] + ".code"
                print(json.dumps({"pid": pid}), file=PROTOCOL, flush=True)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            with open(children.pop(pid) + ".tmp", "w") as f:
                f.write(str(os.waitstatus_to_exitcode(status)))
            os.replace(f.name, f.name[:-4])


serve()
