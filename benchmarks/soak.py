"""A soak test of `gradlm serve`: many thousands of mixed requests over many minutes, with clients that misbehave.

Starts `gradlm serve` (a seeded random model, benchmarks/serve.py's "tiny" shape unless --model/--run say otherwise)
on a free loopback port, then drives it from this process until both --minutes and --requests are reached (and at
most --max-minutes): --clients steady clients, each sending its next request when the previous one ends, drawn from
a seeded mix of completions and chat, whole or streamed, with n > 1, logprobs and constraints (regex, choices, any
JSON object); 10% of streamed requests hang up after their first chunk, a few give up after a short client timeout,
and every --burst-every seconds a burst of --burst requests arrives at once, more than the engine's rows plus its
queue, so the server must refuse some (503 with Retry-After, by design) and then drain.

Reported per minute: requests by outcome, p50/p99 latency of the answered ones, the server's resident memory (from
/proc) and the engine's live rows and waiting requests at the minute's end (GET /health); after each burst, how
long the engine took to get back to zero live rows. Loopback only, bounded in count and time; it stops by itself.

    python benchmarks/soak.py                      # the figures in docs/benchmarks.md (>= 10 min, >= 20,000 requests)
    python benchmarks/soak.py --minutes 1 --requests 500 --burst-every 20     # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import PROMPTS, cpu_model, random_run, start_server  # noqa: E402  (benchmarks/serve.py)

CHOICES = ["statin", "beta blocker", "ACE inhibitor"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def draw(rng: random.Random, i: int) -> tuple[str, dict, str]:
    """(path, body, behaviour) of request i: behaviour is "whole", "stream", "hangup" (leaves after the first
    chunk) or "timeout" (gives up after 50 ms)."""
    chat = rng.random() < 0.45
    body: dict = {"max_tokens": rng.choice([8, 16, 32, 64]), "seed": i, "temperature": rng.choice([0, 0.8, 1.0])}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    r = rng.random()
    if r < 0.12:
        body["n"] = rng.choice([2, 3])
    elif r < 0.24:
        body["logprobs" if not chat else "top_logprobs"] = 2
        if chat:
            body["logprobs"] = True
    kind = rng.random()
    if kind < 0.04:
        body["regex"] = "[0-9]{1,3} (mg|ml)"
    elif kind < 0.07:
        body["choices"] = CHOICES
    elif kind < 0.09 and chat:
        body["response_format"] = {"type": "json_object"}
        body["max_tokens"] = 32
    how = rng.random()
    behaviour = "whole"
    if how < 0.30:
        body["stream"] = True
        behaviour = "hangup" if rng.random() < 0.10 else "stream"
    elif how < 0.33:
        behaviour = "timeout"
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, behaviour


class Soak:
    def __init__(self, url: str, pid: int, seed: int):
        self.url, self.pid, self.rng = url, pid, random.Random(seed)
        self.i, self.t0 = 0, time.monotonic()
        self.rows: list[dict] = []  # one per finished request: minute, outcome, latency

    async def one(self, client: httpx.AsyncClient) -> None:
        self.i += 1
        path, body, behaviour = draw(self.rng, self.i)
        t0 = time.monotonic()
        outcome = "?"
        try:
            if body.get("stream"):
                async with client.stream("POST", path, json=body) as r:
                    outcome = str(r.status_code)
                    async for line in r.aiter_lines():
                        if behaviour == "hangup" and line.startswith("data: {"):
                            outcome = "hung up"
                            break  # leaving the block closes the connection mid-stream
            else:
                r = await client.post(path, json=body, timeout=0.05 if behaviour == "timeout" else 120)
                outcome = str(r.status_code)
        except httpx.TimeoutException:
            outcome = "timed out" if behaviour == "timeout" else "timeout!"
        except httpx.HTTPError as e:
            outcome = f"client error {type(e).__name__}"
        self.rows.append({"minute": int((t0 - self.t0) // 60), "outcome": outcome, "latency": time.monotonic() - t0})

    async def steady(self, client: httpx.AsyncClient, until) -> None:
        while not until():
            await self.one(client)

    async def health(self, client: httpx.AsyncClient) -> dict:
        return (await client.get("/health")).json()

    async def burst(self, client: httpx.AsyncClient, n: int) -> dict:
        """n requests at once; then how long until the engine has no live rows and nothing waiting."""
        before = len(self.rows)
        await asyncio.gather(*(self.one(client) for _ in range(n)))
        refused = sum(r["outcome"] == "503" for r in self.rows[before:])
        t0 = time.monotonic()
        while True:
            h = await self.health(client)
            if not h["running"] and not h["waiting"]:
                break
            if time.monotonic() - t0 > 60:
                break
            await asyncio.sleep(0.05)
        return {
            "at_s": round(t0 - self.t0),
            "requests": n,
            "refused_503": refused,
            "drained_s": round(time.monotonic() - t0, 2),
            "rows_after": h["running"],
            "waiting_after": h["waiting"],
        }


async def run(args, url: str, pid: int) -> dict:
    soak = Soak(url, pid, args.seed)
    minutes: list[dict] = []
    bursts: list[dict] = []
    # keep-alive shorter than the server's (uvicorn closes an idle connection after 5 s): a request sent on a connection
    # the server is closing at that moment fails in the client (ReadError), a race of HTTP keep-alive, not an answer
    limits = httpx.Limits(
        max_connections=args.clients + args.burst + 8,
        max_keepalive_connections=args.clients + args.burst,
        keepalive_expiry=3,
    )
    end_min = soak.t0 + args.minutes * 60
    hard_end = soak.t0 + args.max_minutes * 60

    def done() -> bool:
        now = time.monotonic()
        return now >= hard_end or (now >= end_min and soak.i >= args.requests)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def monitor():
            next_minute, next_burst = soak.t0 + 60, soak.t0 + args.burst_every
            while not done():
                await asyncio.sleep(0.2)
                now = time.monotonic()
                if now >= next_burst:
                    next_burst += args.burst_every
                    bursts.append(await soak.burst(client, args.burst))
                if now >= next_minute:
                    h = await soak.health(client)
                    minutes.append(
                        {
                            "minute": len(minutes) + 1,
                            "rss_mb": round(rss_mb(pid), 1),
                            "rows": h["running"],
                            "waiting": h["waiting"],
                            "requests_so_far": soak.i,
                        }
                    )
                    print(
                        f"minute {len(minutes)}: {soak.i:,} requests, RSS {minutes[-1]['rss_mb']} MB, rows "
                        f"{h['running']}, waiting {h['waiting']}",
                        flush=True,
                    )
                    next_minute += 60

        await asyncio.gather(monitor(), *(soak.steady(client, done) for _ in range(args.clients)))
        final = await soak.health(client)
    return {
        "rows": soak.rows,
        "minutes": minutes,
        "bursts": bursts,
        "final": final,
        "seconds": time.monotonic() - soak.t0,
    }


def report(args, result: dict, server_line: str) -> str:
    rows = result["rows"]
    out = [
        f"machine: {cpu_model()}, {result['seconds'] / 60:.1f} minutes, {len(rows):,} requests; {server_line}",
        "",
        "| minute | requests | 200 | 503 (queue full) | other 4xx | 5xx | hung up / timed out (client) | p50 ms | p99 "
        "ms | server RSS MB | live rows, waiting at the minute's end |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in result["minutes"]:
        mine = [r for r in rows if r["minute"] == m["minute"] - 1]
        ok = sorted(r["latency"] for r in mine if r["outcome"] == "200")
        q = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) > 1 else [float("nan")] * 99
        count = lambda pred: sum(1 for r in mine if pred(r["outcome"]))  # noqa: E731
        out.append(
            f"| {m['minute']} | {len(mine):,} | {count(lambda o: o == '200'):,} | {count(lambda o: o == '503'):,} | "
            f"{count(lambda o: o.startswith('4')):,} | {count(lambda o: o.startswith('5') and o != '503'):,} | "
            f"{count(lambda o: o in ('hung up', 'timed out')):,} | {q[49] * 1000:.0f} | {q[98] * 1000:.0f} | "
            f"{m['rss_mb']} | {m['rows']}, {m['waiting']} |"
        )
    five = sum(1 for r in rows if r["outcome"].startswith("5") and r["outcome"] != "503")
    odd = {
        o: sum(r["outcome"] == o for r in rows)
        for o in sorted({r["outcome"] for r in rows} - {"200", "503", "hung up", "timed out"})
    }
    rss = [m["rss_mb"] for m in result["minutes"]]
    growth = (rss[-1] - rss[1]) / rss[1] if len(rss) > 2 else float("nan")
    out += [
        "",
        f"5xx other than 503: {five}; other outcomes: {odd or 'none'}; RSS after warm-up (minute 2 -> {len(rss)}): "
        f"{rss[1] if len(rss) > 1 else float('nan')} -> {rss[-1]} MB ({growth:+.1%}); at the end: "
        f"{result['final']['running']} live rows, "
        f"{result['final']['waiting']} waiting",
        "",
        "| burst at s | requests at once | refused 503 | drained in s | live rows after |",
        "|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {b['at_s']} | {b['requests']} | {b['refused_503']} | {b['drained_s']} | {b['rows_after']} |"
        for b in result["bursts"]
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.5)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--max-minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument(
        "--burst",
        type=int,
        default=120,
        help="requests sent at once in a burst (the server takes max-batch + max-queue = 16 + 64)",
    )
    ap.add_argument("--burst-every", type=float, default=45)
    ap.add_argument("--model", default="tiny", choices=["tiny", "demo"])
    ap.add_argument("--run", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write every figure to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run) if args.run else random_run(Path(tmp), args.model)
        proc, url, line = start_server(run_dir, 16, args.threads, "cpu")
        try:
            result = asyncio.run(run(args, url, proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    text = report(args, result, line)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
