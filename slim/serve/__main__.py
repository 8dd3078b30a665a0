"""python -m slim.serve MODEL --policy NAME=FOLDER ... [--host 127.0.0.1] [--port 8000]

Serves MODEL (a registry key, a hub id, or --model_dir) and its policies
behind an OpenAI-compatible API: `<model>` is the unedited model,
`<model>+NAME` the model under the policy saved in FOLDER. Set SLIM_API_KEY
to require `Authorization: Bearer <key>`. Binds 127.0.0.1 unless --host says
otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

from slim.config import ParameterError
from slim_utils import COMMON_FLAGS, add_flags, run_main

log = logging.getLogger("slim.serve")

_MODEL_FLAGS = ("model_name", "--model_dir", "--head_layout", "--device", "--dtype", "--allow_offload")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slim.serve", description=__doc__.split("\n\n")[1])
    add_flags(parser, [(flag, kwargs) for flag, kwargs in COMMON_FLAGS if flag in _MODEL_FLAGS])
    parser.add_argument("--policy", action="append", default=[], metavar="NAME=FOLDER",
                        help="a saved policy to serve as <model>+NAME (repeat for several)")  # fmt: skip
    parser.add_argument("--served_name", default=None, help="the model's name in the API (default: MODEL)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch", type=int, default=16, help="rows decoded together at most")
    parser.add_argument("--wait_ms", type=float, default=5.0, help="how long a batch waits for more requests")
    parser.add_argument("--max_tokens", type=int, default=1024, help="the largest max_tokens a request may ask")
    parser.add_argument("--max_prompt_tokens", type=int, default=4096)
    parser.add_argument("--max_n", type=int, default=8, help="the largest n (choices per prompt)")
    parser.add_argument("--max_prompts", type=int, default=32, help="prompts per completions request at most")
    parser.add_argument("--max_body_bytes", type=int, default=1 << 20)
    return parser.parse_args(argv)


def policy_specs(specs: list[str]) -> dict[str, Path]:
    """{name: folder} from NAME=FOLDER flags; ParameterError (one line) for a bad or repeated name."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or not folder:
            raise ParameterError("policy", f"must be NAME=FOLDER with NAME of letters, digits, _ . -, got {spec!r}.")
        if name in out:
            raise ParameterError("policy", f"names {name!r} twice.")
        out[name] = Path(folder)
    return out


def load_policies(specs: dict[str, Path], model=None) -> dict:
    """Each saved policy (no pickle: safetensors and JSON), checked against `model`'s fingerprint when given."""
    import slim.policies  # noqa: F401 - registers every policy kind
    from slim.policies.base import Policy

    policies = {}
    for name, folder in specs.items():
        try:
            policy = Policy.load(folder)
            if model is not None:
                policy.check_model(model)
        except ValueError as err:
            raise ParameterError("policy", f"{name}={folder}: {err}") from None
        policies[name] = policy
    return policies


def main(argv=None) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        missing = f"the server needs FastAPI and uvicorn ({err.name} is missing)"
        raise RuntimeError(f"{missing}: bash install.sh, or pip install 'fastapi>=0.110' 'uvicorn>=0.29'") from None

    from slim.models.loading import load_model
    from slim.serve.app import Served, create_app
    from slim.serve.engine import Engine
    from slim.serve.protocol import Limits

    args = parse_args(argv)
    specs = policy_specs(args.policy)
    load_policies(specs)  # a missing or damaged folder stops here, before the model loads
    lm = load_model(args.model_name, device=args.device, model_dir=args.model_dir, dtype=args.dtype,
                    head_layout=args.head_layout, allow_offload=args.allow_offload)  # fmt: skip
    policies = load_policies(specs, lm.model)
    name = args.served_name or (Path(args.model_dir).name if args.model_dir else args.model_name)
    limits = Limits(args.max_body_bytes, args.max_prompt_tokens, args.max_tokens, args.max_n, args.max_prompts)
    context = getattr(lm.model.config, "max_position_embeddings", None)
    engine = Engine(lm.model, lm.tokenizer, max_batch=args.max_batch, wait_s=args.wait_ms / 1000).start()
    served = Served(name, engine, lm.tokenizer, policies, limits, os.environ.get("SLIM_API_KEY") or None, context)
    log.info("serving %s on http://%s:%d/v1 (%s)", name, args.host, args.port,
             ", ".join([name, *(f"{name}+{p}" for p in policies)]))  # fmt: skip
    try:
        uvicorn.run(create_app(served), host=args.host, port=args.port, log_level="info")
    finally:
        engine.close()


if __name__ == "__main__":
    run_main(main)
