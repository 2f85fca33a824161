"""podman as the image tests drive it: set up by scripts/podman-setup.sh (packages, this kind of
machine's containers.conf, a local debian:bookworm-slim), then its command line, as an operator
types it, with that containers.conf."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


class Podman:
    def __init__(self, containers_conf: str) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": containers_conf}

    @classmethod
    def set_up(cls) -> Podman:
        """Run scripts/podman-setup.sh (idempotent: the first time it installs podman and makes
        the base image, about 2 minutes; then a second)."""
        done = subprocess.run(
            [str(ROOT / "scripts" / "podman-setup.sh")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"scripts/podman-setup.sh failed:\n{done.stderr}"
        return cls(done.stdout.strip().splitlines()[-1])

    def run(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        if check:
            assert done.returncode == 0, (
                f"podman {' '.join(args)}: {done.returncode}\n{done.stderr}"
            )
        return done

    def inspect(self, name: str) -> dict[str, Any]:
        [found] = json.loads(self.run("inspect", name).stdout)
        assert isinstance(found, dict)
        return found

    def logs(self, name: str) -> str:
        done = self.run("logs", name, check=False)
        return done.stdout + done.stderr

    @contextlib.contextmanager
    def container(self, image: str, *options: str, args: tuple[str, ...] = ()) -> Iterator[str]:
        """`podman run -d OPTIONS IMAGE ARGS`, yielding its name; removed at the end, with its
        log shown if the test failed. Never pulled: no registry is in reach, and a missing image
        must fail here rather than look for one."""
        name = f"kine-test-{uuid.uuid4().hex[:10]}"
        self.run("run", "-d", "--pull=never", "--name", name, *options, image, *args)
        try:
            yield name
        except BaseException:
            print(f"--- podman logs {name} ---\n{self.logs(name)}")
            raise
        finally:
            self.run("rm", "-f", "-t", "0", name, check=False)

    def wait(self, name: str, timeout: float = 60.0) -> int:
        """The exit code of a container that ends by itself."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.inspect(name)["State"]
            if state["Status"] in ("exited", "stopped"):
                return int(state["ExitCode"])
            time.sleep(0.2)
        raise AssertionError(f"{name} still running after {timeout:.0f}s:\n{self.logs(name)}")
