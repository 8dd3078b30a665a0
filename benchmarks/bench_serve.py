"""The server under load: concurrent clients with mixed policies against the same requests one at a time.

    python benchmarks/bench_serve.py --policy slim=FOLDER --policy iti=FOLDER        # 512 requests, 32 clients

Starts `python -m slim.serve` as a process on loopback and sends it
TruthfulQA questions as short completions prompts ("Q: <question>\nA:",
greedy, `--max_tokens` new tokens each; short, so that decoding rather than
reading the prompt dominates, as in a chat), cycling over the base model and every policy (the first
policy also once more at half its knob, through the request's `slim`
field). Three phases in one run:

1. one at a time: every request alone, one after another (the reference);
2. under load: the same requests from `--clients` concurrent clients;
3. the edit's cost: the first `--cost_requests` prompts under load, all on
   the base model and all under the first policy, each row decoding all
   `--max_tokens` (`ignore_eos`, so both run the same batch shapes),
   alternating `--rounds` times (Table 4's measure: time per generated
   token, edited over plain; the median round of each).

Prints the errors under load (goal 0), the requests whose text or token count
differs from the one-at-a-time reference (goal 0), p50 / p99 latency, and
tokens per second of each phase with the ratio under load / one at a time
(goal >= 3 on two CPU cores), then the edit's cost per token (goal within
3 %). Without --policy a random SLIM policy (probes and maps at layer 19, the
detector firing often) is served, and said so. Loopback only; every phase is
bounded by --requests and a timeout per request.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402

from slim.data.truthfulqa import load_truthfulqa  # noqa: E402
from slim.evaluation.reports import KNOBS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_name", nargs="?", default="smollm2_135M")
    p.add_argument("--model_dir", default=None)
    p.add_argument("--policy", action="append", default=[], metavar="NAME=FOLDER")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max_tokens", type=int, default=24)
    p.add_argument("--max_batch", type=int, default=32, help="the server's --max_batch")
    p.add_argument("--rounds", type=int, default=3, help="plain / edited pairs of the edit's cost phase")
    p.add_argument("--cost_requests", type=int, default=128, help="requests of each pass of the edit's cost phase")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--phases", default="alone,load,cost", help="which phases to run (alone and load go together)")
    p.add_argument("--tqa_dir", default=None)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_policy_folder(model_name: str, model_dir: str | None, folder: Path) -> Path:
    """A random SLIM policy for the model, saved (bench_answering's: layer 19, tau 2, kappa 5)."""
    from bench_answering import random_slim

    from slim.models.loading import load_model

    lm = load_model(model_name, model_dir=model_dir, device="cpu")
    return random_slim(lm.model).save(folder / "random_slim")


def start_server(args, policies: dict[str, str], port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slim.serve", args.model_name, "--device", "cpu", "--port", str(port),
           "--max_batch", str(args.max_batch), "--max_n", "1"]  # fmt: skip
    if args.model_dir:
        cmd += ["--model_dir", args.model_dir]
    for name, folder in policies.items():
        cmd += ["--policy", f"{name}={folder}"]
    log = open(Path(tempfile.gettempdir()) / f"bench_serve_{port}.log", "w")  # noqa: SIM115 - the server's lifetime
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])


def wait_ready(base: str, proc: subprocess.Popen) -> dict:
    """The served model names, once the server answers."""
    for _ in range(3000):
        if proc.poll() is not None:
            sys.exit(f"error: the server stopped (exit {proc.returncode}); see {proc.args}")
        try:
            return {m["id"] for m in httpx.get(f"{base}/v1/models", timeout=5).json()["data"]}
        except httpx.TransportError:
            time.sleep(0.2)
    sys.exit("error: the server did not start within 10 minutes.")


async def send(client: httpx.AsyncClient, body: dict, timeout: float) -> tuple[float, dict | str]:
    """(seconds, the reply or a one-line error) of one request."""
    t0 = time.perf_counter()
    try:
        reply = await client.post("/v1/completions", json=body, timeout=timeout)
        out = reply.json() if reply.status_code == 200 else f"HTTP {reply.status_code}: {reply.text[:200]}"
    except httpx.HTTPError as err:
        out = f"{type(err).__name__}: {err}"
    return time.perf_counter() - t0, out


async def phase(base: str, bodies: list[dict], clients: int, timeout: float) -> tuple[float, list]:
    """(wall seconds, [(seconds, reply)] in the bodies' order) with `clients` requests in flight at most."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    gate = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(base_url=base, limits=limits) as client:

        async def one(body):
            async with gate:
                return await send(client, body, timeout)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in bodies))
    return time.perf_counter() - t0, results


def tokens_of(results) -> int:
    return sum(r["usage"]["completion_tokens"] for _, r in results if isinstance(r, dict))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def first_difference(a: dict, b: dict) -> str:
    """Where two replies part (token index), with the reference's top-2 log-probability gap there: a gap near
    0 is a near-tie that floating-point sums in another order (another batch shape) may flip."""
    ta, tb = a["choices"][0]["logprobs"], b["choices"][0]["logprobs"]
    for k, (x, y) in enumerate(zip(ta["tokens"], tb["tokens"])):
        if x != y:
            top = sorted(ta["top_logprobs"][k].values(), reverse=True)
            gap = top[0] - top[1] if len(top) > 1 else float("nan")
            return f"token {k}: {x!r} alone vs {y!r} under load, top-2 log-probability gap {gap:.2e}"
    return f"lengths {len(ta['tokens'])} vs {len(tb['tokens'])}"


def compare_alone_and_load(args, base: str, bodies: list[dict]) -> None:
    """Phases 1 and 2: every request alone, then under load; errors, differences, latency, throughput."""
    alone_s, alone = asyncio.run(phase(base, bodies, 1, args.timeout))
    load_s, load = asyncio.run(phase(base, bodies, args.clients, args.timeout))
    errors = [r for _, r in load if not isinstance(r, dict)] + [r for _, r in alone if not isinstance(r, dict)]
    differ = [
        i for i, ((_, a), (_, b)) in enumerate(zip(alone, load))
        if not isinstance(a, dict) or not isinstance(b, dict) or a["choices"][0]["text"] != b["choices"][0]["text"]
        or a["usage"]["completion_tokens"] != b["usage"]["completion_tokens"]
    ]  # fmt: skip
    latency = [s for s, r in load if isinstance(r, dict)]
    alone_tps, load_tps = tokens_of(alone) / alone_s, tokens_of(load) / load_s
    print(f"errors under load: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    print(f"requests whose text or token count differs from one at a time: {len(differ)} of {args.requests}")
    for i in differ:
        a, b = alone[i][1], load[i][1]
        where = first_difference(a, b) if isinstance(a, dict) and isinstance(b, dict) else "an error"
        arm = bodies[i]["model"] + (f", {json.dumps(bodies[i]['slim'])}" if "slim" in bodies[i] else "")
        print(f"  request {i} ({arm}): {where}")
    print(f"latency under load ({args.clients} clients): p50 {percentile(latency, 50):.2f} s, "
          f"p99 {percentile(latency, 99):.2f} s")  # fmt: skip
    print(f"one at a time: {tokens_of(alone)} tokens in {alone_s:.1f} s, {alone_tps:.1f} tokens/s")
    print(f"under load:    {tokens_of(load)} tokens in {load_s:.1f} s, {load_tps:.1f} tokens/s")
    print(f"throughput under load / one at a time: {load_tps / alone_tps:.2f}x (goal >= 3)")


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    policies = dict(spec.partition("=")[::2] for spec in args.policy)
    tmp = tempfile.TemporaryDirectory()
    if not policies:
        policies = {"random_slim": str(random_policy_folder(args.model_name, args.model_dir, Path(tmp.name)))}
        print("no --policy given: serving a random SLIM policy (layer 19, tau 2, kappa 5), not a fitted one")
    first = json.loads((Path(next(iter(policies.values()))) / "policy.json").read_text())
    knob = KNOBS.get(first["kind"])
    questions = load_truthfulqa(args.tqa_dir)["Question"].tolist()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, policies, port)
    try:
        served = wait_ready(base, proc)
        name = args.model_dir and Path(args.model_dir).name or args.model_name
        arms = [{"model": name}] + [{"model": f"{name}+{p}"} for p in policies]
        if knob and knob in first.get("params", {}):
            half = first["params"][knob] / 2
            arms.append({"model": f"{name}+{next(iter(policies))}", "slim": {"strength": half}})
        assert {a["model"] for a in arms} <= served, (arms, served)
        common = {"max_tokens": args.max_tokens, "temperature": 0, "logprobs": 2}
        bodies = [{**common, **arms[i % len(arms)], "prompt": f"Q: {questions[i % len(questions)]}\nA:"}
                  for i in range(args.requests)]  # fmt: skip
        print(f"{args.requests} requests over {len(arms)} arms ({', '.join(json.dumps(a) for a in arms)}), "
              f"greedy, max_tokens {args.max_tokens}; server --max_batch {args.max_batch}")  # fmt: skip

        if "alone" in args.phases or "load" in args.phases:
            compare_alone_and_load(args, base, bodies)
        if "cost" not in args.phases:
            return
        # the edit's own cost: the same prompts, all plain then all edited, alternating
        # every row decodes all max_tokens (ignore_eos), so both passes run the same batch shapes
        plain_body = [{**b, "model": name, "ignore_eos": True} for b in bodies[: args.cost_requests]]
        edited_body = [{**b, "model": f"{name}+{next(iter(policies))}", "ignore_eos": True}
                       for b in bodies[: args.cost_requests]]  # fmt: skip
        for b in plain_body + edited_body:
            b.pop("slim", None)
        spt = {"plain": [], "edited": []}  # seconds per generated token, per round
        for r in range(args.rounds):
            for arm in ["plain", "edited"] if r % 2 == 0 else ["edited", "plain"]:
                secs, res = asyncio.run(phase(base, plain_body if arm == "plain" else edited_body, args.clients,
                                              args.timeout))  # fmt: skip
                spt[arm].append(secs / max(1, tokens_of(res)))
        plain, edited = statistics.median(spt["plain"]), statistics.median(spt["edited"])
        print(f"the edit's cost under load ({next(iter(policies))}, {args.cost_requests} requests, {args.rounds} "
              "round(s)): "
              f"{1000 * plain:.2f} vs {1000 * edited:.2f} ms per token, {100 * (edited / plain - 1):+.1f} % "
              "(goal within 3 %)")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        tmp.cleanup()


if __name__ == "__main__":
    main()
