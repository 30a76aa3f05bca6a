"""Shared by the serving tests: tiny saved checkpoints, a real uvicorn server on a loopback port, and a
throwaway PostgreSQL cluster."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from chatforge.checkpoint import save_model
from chatforge.config import ModelConfig
from chatforge.model import GPT
from chatforge.tokenizer import train_tokenizer

TEXT = [
    "The capital of Velora is Mirth. Ada lives in Mirth and builds clocks.",
    '{"name":"Ada","age":31,"city":"Mirth"} json object value',
    "<|im_start|>user\nWho builds clocks?<|im_end|>\n<|im_start|>assistant\nAda builds clocks.<|im_end|>",
]


def make_checkpoints(root: Path, names: tuple[str, ...] = ("base", "sft")) -> dict[str, Path]:
    """Randomly initialised 2-layer x 64-wide models (one seed each) saved as HF checkpoint dirs."""
    tok = train_tokenizer(TEXT * 40, vocab_size=320)
    out = {}
    for i, name in enumerate(names):
        torch.manual_seed(i)
        cfg = ModelConfig(
            vocab_size=384,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
        )
        out[name] = save_model(GPT(cfg), root / name, tokenizer=tok)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def teach_json(path: Path, steps: int = 120) -> None:
    """Train the saved model at ``path`` to answer a chat with a short JSON object, then save it back."""
    from chatforge.checkpoint import load_model
    from chatforge.model import lm_loss
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.load(path)
    model = load_model(path)
    prompt = tok.encode_chat_prompt([{"role": "user", "content": "Who builds clocks?"}])
    reply = [*tok.encode('{"name":"Ada","city":"Mirth"}'), tok.im_end_id]
    ids = torch.tensor([prompt + reply])
    mask = torch.tensor([[0] * len(prompt) + [1] * len(reply)])
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = lm_loss(model(ids[:, :-1]), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model, path, tokenizer=tok)


def postgres_bin() -> Path | None:
    """The directory with PostgreSQL's initdb and pg_ctl (Debian keeps them off PATH), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    return Path(dirs[-1]) if dirs and (Path(dirs[-1]) / "pg_ctl").is_file() else None


@contextmanager
def throwaway_postgres() -> Iterator[str | None]:
    """A fresh PostgreSQL cluster on a free loopback port (socket in its temp dir), stopped and deleted
    afterwards; yields a ``postgresql+psycopg://`` URL of its ``postgres`` database, or None when the
    binaries, psycopg or (as root) the ``postgres`` user to run them as are missing. PostgreSQL refuses
    to run as root, so as root every command runs through ``runuser -u postgres``."""
    try:
        import psycopg  # noqa: F401  (the driver SQLAlchemy will use)
    except ImportError:
        yield None
        return
    bindir = postgres_bin()
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pw = None
        if pw is None or not shutil.which("runuser"):
            yield None
            return
        as_user = ["runuser", "-u", "postgres", "--"]
    if bindir is None:
        yield None
        return
    base = Path(tempfile.mkdtemp(prefix="chatforge-pg-"))
    if as_user:
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data, port = base / "data", free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)

    try:
        run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "chatforge",
            "-E",
            "UTF8",
            "--no-sync",
        )
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
        run(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(base / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        try:
            yield f"postgresql+psycopg://chatforge@127.0.0.1:{port}/postgres"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def fresh_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``server_url``; returns its URL."""
    import psycopg

    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name
