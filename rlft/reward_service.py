"""Any registered reward as an HTTP service, for `reward=http` runs whose scorer lives outside the cluster.

    python -m rlft.reward_service reward=digit --port 8000            # then: python -m rlft.run reward=http \
                                                                       #   reward.url=http://<host>:8000/score
    python -m rlft.reward_service reward=aesthetic device=cuda --host 0.0.0.0 --port 8000

The protocol is `rlft.envs.rewards`' (a POST of JSON with the images as base64 .npy uint8 bytes, answered by
{"scores": [...]}; a non-finite score travels as null). Requests are scored one at a time (the reward model is
not shared between threads); the service listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlft.config import ConfigError, compose, resolve_device
from rlft.envs.rewards import RewardError, decode_images, evaluate_reward

PATH = "/score"


def make_server(reward, host: str, port: int) -> ThreadingHTTPServer:
    """A server scoring POSTs to /score with `reward` (a built rlft Reward); port 0 picks a free port."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if self.path != PATH:
                return self.answer(404, {"error": f"POST to {PATH}"})
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                images = decode_images(request["images"])
                context = {"prompts": request["prompts"]} if "prompts" in request else {}
                with lock:
                    values, finite = evaluate_reward(reward, images, context)
            except (KeyError, ValueError, TypeError) as error:  # the request's fault (RewardError is a ValueError)
                return self.answer(400, {"error": f"{type(error).__name__}: {error}"})
            except Exception as error:  # noqa: BLE001 (the scorer's fault: the client gets its message, not a reset)
                return self.answer(500, {"error": f"{type(error).__name__}: {error}"})
            self.answer(200, {"scores": [v if ok else None for v, ok in zip(values.tolist(), finite.tolist(),
                                                                             strict=True)]})  # fmt: skip

        def answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
            """Quiet: a line per request would flood the terminal."""

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlft.reward_service", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="reward=<name>, reward.<key>=value, device=cpu|cuda")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    outside = [o for o in args.overrides if not o.startswith(("reward=", "reward.", "device="))]
    try:
        if outside:
            raise ConfigError(f"the service takes reward=<name>, reward.<key>=value and device=..., not {outside[0]}")
        spec = compose(args.overrides)
        if spec.reward.name == "http":
            raise ConfigError("reward=http is the client of this service: name the reward to serve, e.g. reward=digit")
        reward = spec.reward.build(resolve_device(spec.device))
        server = make_server(reward, args.host, args.port)
    except (ConfigError, RewardError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"rlft: {error}") from None
    host, port = server.server_address[:2]
    print(f"rlft: serving reward={spec.reward.name} at http://{host}:{port}{PATH} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
