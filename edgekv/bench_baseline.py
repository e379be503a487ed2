"""Another version of edgekv in the same speed run: `edgekv bench speed --baseline REF`.

A change that should not slow decoding down is measured against the code before it, in
turns in one run, so drift in the machine's speed lands on both alike. Two versions of a
package cannot share one interpreter, so the baseline runs in a worker process: its
source is the git ref REF of this checkout (`git archive`), laid out as an importable
package in a temporary folder, and it answers one JSON line per command on its stdin:

    {"load": name, "policy": {...}, "model": path|null}  -> {}
    {"start": name, "ids": [...], "decode_tokens": n}     -> {}            (prefill, first token)
    {"step": name}                                        -> {"done": bool, "seconds": s,
                                                              "figures": {...} when done}

Only the engine API both versions have is used (`edgekv.load`, `Engine.reset`,
`Engine.stream`). While one process decodes, the other waits on its pipe: the turns
never overlap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Generator
from pathlib import Path

from .errors import EdgekvError

WORKER = r'''
import json, sys, time
import edgekv
engines, streams = {}, {}
for line in sys.stdin:
    msg = json.loads(line)
    out = {}
    if "load" in msg:
        engines[msg["load"]] = edgekv.load(msg.get("model"), progress=False, **msg["policy"])
    elif "start" in msg:
        engine = engines[msg["start"]]
        engine.reset()
        streams[msg["start"]] = steps = engine.stream(msg["ids"], max_new_tokens=msg["decode_tokens"], ignore_eos=True)
        next(steps)
    elif "step" in msg:
        started = time.perf_counter()
        try:
            next(streams[msg["step"]])
            out = {"done": False}
        except StopIteration as done:
            s = done.value.stats
            out = {"done": True, "figures": {"prefill_tok_s": s["prefill_tok_s"], "ttft_s": s["ttft_s"],
                                             "tokens": len(done.value.token_ids)}}
        out["seconds"] = time.perf_counter() - started
    print(json.dumps(out), flush=True)
'''


class BaselineWorker:
    """A process running edgekv at git ref `ref` of the checkout at `repo`."""

    def __init__(self, ref: str, repo: Path | None = None, threads: int | None = None):
        repo = repo or Path(__file__).resolve().parents[1]
        self.ref = ref
        self.folder = Path(tempfile.mkdtemp(prefix="edgekv-baseline-"))
        source = self.folder / "src"
        source.mkdir()
        # Before the kernels and the chat app moved under edgekv/, they lay at the top level.
        listing = subprocess.run(["git", "-C", str(repo), "ls-tree", "--name-only", ref],
                                 capture_output=True, text=True)
        top_level = [name for name in ("edgekv", "kernels", "tui") if name in listing.stdout.split()]
        archive = subprocess.run(["git", "-C", str(repo), "archive", ref, *top_level], capture_output=True)
        if listing.returncode != 0 or archive.returncode != 0 or "edgekv" not in top_level:
            shutil.rmtree(self.folder, ignore_errors=True)
            reason = (listing.stderr or archive.stderr.decode()).strip() or "no edgekv/ there"
            raise EdgekvError(f"cannot read git ref {ref!r} of {repo}: {reason}")
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
        root = self.folder / "pkg"  # the installed layout: edgekv/, edgekv/kernels, edgekv/tui
        root.mkdir()
        shutil.move(source / "edgekv", root / "edgekv")
        for name in top_level[1:]:
            shutil.move(source / name, root / "edgekv" / name)
        set_threads = f"import torch; torch.set_num_threads({threads})\n" if threads else ""
        self.process = subprocess.Popen([sys.executable, "-c", set_threads + WORKER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1,
                                        env={**os.environ, "PYTHONPATH": str(root)})

    def ask(self, **message) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        line = self.process.stdout.readline()
        if not line:
            raise EdgekvError(f"the baseline worker ({self.ref}) stopped: see its error above")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


def baseline_runner(worker: BaselineWorker, name: str, ids: list[int],
                    decode_tokens: int) -> Generator[None, None, dict]:
    """Like `bench_speed.edgekv_runner`, for engine `name` in the worker: each next() one
    decode step there, timed there (the pipe's round trip is not counted)."""
    worker.ask(start=name, ids=ids, decode_tokens=decode_tokens)
    decode_s, steps = 0.0, 0
    while True:
        yield
        answer = worker.ask(step=name)
        decode_s += answer["seconds"]
        if answer["done"]:
            figures = answer["figures"]
            break
        steps += 1
    return {"prefill_tok_s": figures["prefill_tok_s"], "ttft_s": figures["ttft_s"],
            "decode_tok_s": steps / decode_s if steps and decode_s > 0 else 0.0}
