"""Serving under load: aggregate tokens/s with 16 concurrent clients vs one client at a time.

Starts `gradlm serve` in its own process on a free local port, then, from this process, alternates
--rounds times between the two phases (so both see the same load from anything else on the machine):
  1. one client at a time: --sequential requests in all, each sent when the previous one is answered;
  2. --clients concurrent clients sharing --requests requests in all (each client sends its next request
     as soon as its previous one is answered), which the server's continuous batching decodes together.
Every request is a non-streamed /v1/completions call asking for --max-tokens new tokens (sampled,
--temperature, --top-p, its own seed) after one of a few prompts of different lengths. Tokens/s
counts the completion tokens the server reports (usage) over the wall time of the whole phase;
latency is per request, from sending to the full answer. Any status other than 200 is an error.

The model is a seeded random one (speed does not depend on what the weights say, and it needs no
training) of --model's shape, context 128, vocab 1030: "tiny" (2 layers, d_model 64, 0.2M parameters)
or "demo" (the `make demo` model's shape: 4 layers, d_model 192, 2.2M parameters); or --run RUN.

    python benchmarks/serve.py                            # the figures in docs/benchmarks.md
    python benchmarks/serve.py --model demo --requests 500 --sequential 50
    python benchmarks/serve.py --run runs/demo
    python benchmarks/serve.py --run RUN --dtypes float32,auto   # two servers, the same load alternating between them
    python benchmarks/serve.py --run RUN --dtypes auto,auto:on   # eager against the compiled decoding step

--dtypes starts one server per --dtype (`auto` is int8 on a CPU with AVX512, float32 on others) and alternates the
rounds between them, so the ratio of their aggregate tokens/s is measured side by side under the same load.
`DTYPE:on` serves with `--compile on` (the compiled decoding step, gradlm/model/aot.py; int8 takes it up to 4 rows
with one thread, 16 with more: aot.int8_rows); every other server runs with `--compile off`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from machine import cpu_name

PROMPTS = [
    "ROMEO:",
    "To be, or not to be, that is",
    "KING HENRY:\nOnce more unto the breach, dear friends,",
    "O",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
]


SHAPES = {  # random models (seeded): speed does not depend on what the weights say
    "tiny": {"n_layer": 2, "d_model": 64, "n_head": 4},  # 0.2M parameters: the loop's own overhead dominates
    "demo": {"n_layer": 4, "d_model": 192, "n_head": 6},  # the `make demo` model's shape, 2.2M parameters
}


def random_run(directory: Path, shape: str) -> Path:
    """A run directory holding a seeded random model of the given shape (context 128) and a tokenizer."""
    import torch

    from gradlm import files as ckpt
    from gradlm.model.transformer import Transformer, ModelConfig
    from gradlm.text.tokenizer import Tokenizer

    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    text = corpus.read_text(encoding="utf-8")[:200_000] if corpus.is_file() else " ".join(PROMPTS) * 200
    tok = Tokenizer.train([text], 1024)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=128, **SHAPES[shape]))
    model.reset_parameters(seed=0)
    run = directory / f"random-{shape}"
    run.mkdir()
    ckpt.atomic_write_json(run / "config.json", {"model": model.cfg.to_dict()})
    tok.save(run / "tokenizer.json")
    ckpt.save_weights(run / "model.safetensors", model.state_dict())
    return run


def start_server(
    run: Path, max_batch: int, threads: int, device: str = "auto", dtype: str = "auto"
) -> tuple[subprocess.Popen, str, str]:
    """A server of run with this --dtype; "DTYPE:on" also has --compile on (the compiled decoding step, built before it
    listens), any other --compile off (no background build changing its speed halfway through a round)."""
    dtype, _, compile = dtype.partition(":")
    cmd = [
        sys.executable,
        "-m",
        "gradlm",
        "serve",
        str(run),
        "--port",
        "0",
        "--max-batch",
        str(max_batch),
        "--threads",
        str(threads),
        "--device",
        device,
        "--dtype",
        dtype,
        "--compile",
        compile or "off",
    ]
    env = {k: v for k, v in os.environ.items() if k != "GRADLM_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    ready = select.select([proc.stdout], [], [], 300)[0]
    line = proc.stdout.readline() if ready else ""  # "serving NAME (...) at http://127.0.0.1:PORT/ (playground); ..."
    if not line.startswith("serving"):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split(" at ")[1].split("/ ")[0], line.strip()


class Connection:
    """A minimal keep-alive HTTP/1.1 client for POSTing JSON: the load generator shares the 2 cores with
    the server, so it should cost as little CPU as it can (httpx costs ~1 ms of CPU per request here)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        payload = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection") == "close":
            self.writer.close()
            self.writer = None
        return status, json.loads(payload)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(url: str, clients: int, requests: int, sampling: dict, seed0: int) -> dict:
    """`clients` connections share `requests` requests; each sends its next one when answered."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies, tokens, errors = [], 0, {}
    next_index = 0

    async def worker():
        nonlocal next_index, tokens
        conn = Connection(host, int(port))
        try:
            while next_index < requests:
                i = next_index
                next_index += 1
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": seed0 + i, **sampling}
                t0 = time.perf_counter()
                try:
                    status, answer = await conn.post("/v1/completions", body)
                except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    conn.close()
                    conn = Connection(host, int(port))
                    continue
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors[status] = errors.get(status, 0) + 1
                    continue
                tokens += answer["usage"]["completion_tokens"]
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"requests": requests, "tokens": tokens, "wall": wall, "latencies": latencies, "errors": errors}


def total(rounds: list[dict]) -> dict:
    """Several rounds of one phase as one: tokens/s over their summed wall time, latency percentiles."""
    lat = sorted(x for r in rounds for x in r["latencies"])
    q = statistics.quantiles(lat, n=100, method="inclusive")
    errors: dict = {}
    for r in rounds:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    tokens, wall = sum(r["tokens"] for r in rounds), sum(r["wall"] for r in rounds)
    return {
        "requests": sum(r["requests"] for r in rounds),
        "tokens": tokens,
        "wall": wall,
        "tps": tokens / wall,
        "p50": q[49],
        "p99": q[98],
        "errors": errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", choices=sorted(SHAPES), default="tiny", help="shape of the random model served (unless --run)"
    )
    ap.add_argument("--run", default="", help="serve this run directory instead of a random model")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=2000, help="requests shared by the concurrent clients")
    ap.add_argument("--sequential", type=int, default=100, help="requests sent one at a time (the baseline)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens asked for per request")
    ap.add_argument("--temperature", type=float, default=0.8, help="temperature of every request (0 = greedy)")
    ap.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling of every request (1 = off, the API default)"
    )
    ap.add_argument("--threads", type=int, default=0, help="the server's --threads (0 = its default)")
    ap.add_argument("--device", default="auto", help="the server's --device (default auto: the GPU if there is one)")
    ap.add_argument(
        "--rounds", type=int, default=5, help="rounds alternating the two phases (each does 1/rounds of the requests)"
    )
    ap.add_argument(
        "--dtypes", default="auto", help="the servers' --dtype, comma separated: one server each, rounds alternating"
    )
    args = ap.parse_args()

    import torch

    dtypes = args.dtypes.split(",")
    ones: dict[str, list] = {d: [] for d in dtypes}
    manys: dict[str, list] = {d: [] for d in dtypes}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else random_run(Path(tmp), args.model)
        servers = {}
        try:
            for d in dtypes:
                servers[d] = start_server(run, max(args.clients, 1), args.threads, args.device, d)
                print(f"--dtype {d}: {servers[d][2]}")
            print(
                f"machine: {cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; "
                f"torch {torch.__version__}; Python {platform.python_version()}"
            )
            print(
                f"requests: /v1/completions, {args.max_tokens} new tokens, temperature {args.temperature}, top-p "
                f"{args.top_p}, {len(PROMPTS)} prompts of 1 to ~15 tokens, each its own seed\n"
            )
            sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
            for _, url, _ in servers.values():
                asyncio.run(load(url, 4, 16, sampling, 10**6))  # warm-up
            for k in range(args.rounds):  # alternate phases and servers, so all see the same machine load
                for d, (_, url, _) in servers.items():
                    ones[d].append(asyncio.run(load(url, 1, args.sequential // args.rounds, sampling, k * 10**4)))
                    manys[d].append(
                        asyncio.run(load(url, args.clients, args.requests // args.rounds, sampling, 10**5 + k * 10**4))
                    )
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    print(
        "| --dtype | clients | requests | completion tokens | wall (s) | tokens/s | p50 latency (ms) | "
        "p99 latency (ms) | errors |"
    )
    print(
        "|---|--------:|---------:|------------------:|---------:|---------:|-----------------:|-----------------:|"
        "-------:|"
    )
    errors = 0
    for d in dtypes:
        one, many = total(ones[d]), total(manys[d])
        for clients, r in ((1, one), (args.clients, many)):
            errs = sum(r["errors"].values())
            errors += errs
            print(
                f"| {d} | {clients} | {r['requests']:,} | {r['tokens']:,} | {r['wall']:.1f} | {r['tps']:,.0f} | "
                f"{1000 * r['p50']:.0f} | {1000 * r['p99']:.0f} | {errs}{' ' + str(r['errors']) if errs else ''} |"
            )
    for d in dtypes:
        ratios = [m["tokens"] / m["wall"] / (o["tokens"] / o["wall"]) for o, m in zip(ones[d], manys[d])]
        print(
            f"\n--dtype {d}: aggregate tokens/s with {args.clients} concurrent clients / one client at a time: "
            f"{total(manys[d])['tps'] / total(ones[d])['tps']:.2f}x overall; "
            f"per round {', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}x)"
        )
    for d in dtypes[1:]:
        ratios = [(b["tokens"] / b["wall"]) / (a["tokens"] / a["wall"]) for a, b in zip(manys[dtypes[0]], manys[d])]
        print(
            f"--dtype {d} / --dtype {dtypes[0]} at {args.clients} clients: "
            f"{total(manys[d])['tps'] / total(manys[dtypes[0]])['tps']:.2f}x overall; "
            f"per round {', '.join(f'{r:.2f}' for r in ratios)}"
        )
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
