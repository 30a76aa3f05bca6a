"""Run untrusted, model-written Python against tests in a locked-down subprocess.

Limits: wall-clock timeout (the whole process group is killed), CPU seconds and address space
(``resource.setrlimit``), a fresh temporary working directory that is deleted afterwards, an empty
environment (no proxies, no credentials, no PYTHONPATH), Python's isolated mode, and sockets disabled
before the candidate code runs. This is a guard against accidents (infinite loops, memory hogs, stray
file writes), not a security boundary against a determined attacker: use a container for that.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from math import comb

CODE_NAME = "candidate.py"  # the name a traceback gives the program (in the sandbox's working directory)

# Runs before the candidate: no network, no subprocesses spawning more work, no os.system.
_PRELUDE = """\
import socket as _s, os as _o, subprocess as _sp, _posixsubprocess as _ps
def _blocked(*a, **k):
    raise OSError("network and subprocesses are disabled in the eval sandbox")
_s.socket = _s.create_connection = _s.socketpair = _blocked
_o.system = _o.fork = _o.forkpty = _o.execv = _o.execve = _o.popen = _blocked
_o.posix_spawn = _o.posix_spawnp = _ps.fork_exec = _blocked
_sp.Popen = _sp.run = _sp.call = _sp.check_output = _blocked
del _s, _o, _sp, _ps, _blocked
"""

# The candidate runs from its own file, compiled under its own name, so a traceback's line numbers are
# its own (they were shifted by the limits and the prelude above it). It runs in this module's globals:
# __name__ == "__main__", and unittest.main() or pickle find what it defines. A traceback is printed
# without this runner's frame (500 bytes of stderr are kept). SystemExit passes through: a sys.exit(0)
# still ends the process before the last line, which alone writes the done marker.
_RUN = """\
__file__ = {path!r}
try:
    exec(compile(open({code!r}, encoding="utf-8").read(), {code!r}, "exec", dont_inherit=True))
except SystemExit:
    raise
except BaseException as _e:
    import sys as _sys
    _e = _e.with_traceback(_e.__traceback__.tb_next)  # the hook prints the exception's own traceback
    _sys.excepthook(type(_e), _e, _e.__traceback__)
    _sys.exit(1)
open({done!r}, "w").close()
"""


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "memory" | "error"
    seconds: float
    stderr_tail: str = ""


def _limits(memory_mb: int, cpu_s: float) -> str:
    """The prelude's first lines: the child sets its own limits once it runs. (A ``preexec_fn`` would do it
    between fork and exec, which Python documents as unsafe when threads run, and ``code_exec`` grades
    from a thread pool.)"""
    mem = memory_mb * 1024 * 1024
    cpu = max(1, int(cpu_s + 1))
    fsize = 16 * 1024 * 1024
    return (
        "import resource as _r\n"
        f"_r.setrlimit(_r.RLIMIT_AS, ({mem}, {mem}))\n"
        f"_r.setrlimit(_r.RLIMIT_CPU, ({cpu}, {cpu + 1}))\n"
        f"_r.setrlimit(_r.RLIMIT_FSIZE, ({fsize}, {fsize}))\n"
        "_r.setrlimit(_r.RLIMIT_CORE, (0, 0))\n"
        "del _r\n"
    )


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run ``code`` (candidate + tests; a failing assert or any exception = failed) in the sandbox.

    It passes only if it runs to its last line: a ``sys.exit(0)``, ``exit()`` or ``unittest.main()`` in
    the candidate ends the process with status 0 before the tests have run, which is not a pass.
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chatforge-sandbox-") as tmp:
        done = os.path.join(tmp, f".done-{secrets.token_hex(8)}")  # written by the script's last line only
        script = os.path.join(tmp, ".runner.py")
        with open(os.path.join(tmp, CODE_NAME), "w", encoding="utf-8") as f:
            f.write(code)
        with open(script, "w", encoding="utf-8") as f:
            f.write(
                _limits(memory_mb, timeout_s)
                + _PRELUDE
                + _RUN.format(code=CODE_NAME, path=os.path.join(tmp, CODE_NAME), done=done)
            )
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "no_proxy": "*"}
        # stderr goes to a file (capped by RLIMIT_FSIZE), not a pipe: communicate() on a pipe kept all of a
        # print loop's output in this process (gigabytes within the timeout) and waited past the timeout.
        err_path = os.path.join(tmp, ".stderr")
        with open(err_path, "wb") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", script],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
                start_new_session=True,  # its own process group: a timeout kills everything it started
            )
            try:
                proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # The whole process group, after a normal exit too: nothing it started outlives it.
                with _suppress():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if timed_out:
            return SandboxResult(False, "timeout", time.perf_counter() - t0)
        finished = os.path.exists(done)
        with open(err_path, "rb") as f:
            f.seek(max(0, os.path.getsize(err_path) - 500))
            tail = f.read().decode(errors="replace")
    secs = time.perf_counter() - t0
    if proc.returncode == 0 and finished:
        return SandboxResult(True, "passed", secs, tail)
    if proc.returncode == 0:
        return SandboxResult(False, "failed", secs, tail + "\n(exited before the end of the tests)")
    if "MemoryError" in tail or proc.returncode == -signal.SIGKILL:
        return SandboxResult(False, "memory", secs, tail)
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult(False, "timeout", secs, tail)
    status = "failed" if "AssertionError" in tail else "error"
    return SandboxResult(False, status, secs, tail)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is ProcessLookupError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for ``c`` correct of ``n`` samples."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)
