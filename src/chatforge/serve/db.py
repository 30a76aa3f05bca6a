"""The serving database (SQLAlchemy 2.0): conversations, messages, votes, model versions, API keys.

SQLite by default (``sqlite:///runs/<name>/serve.db``), any SQLAlchemy URL for production (PostgreSQL:
``postgresql+psycopg://user:pw@host/db``). Tables are created on first use. API keys are stored as
SHA-256 hashes only: the plaintext is shown once, when the key is made. Rater ids are pseudonymous: the
browser makes a random id and we store only a salted hash of it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.pool import StaticPool

from chatforge.errors import ChatforgeError

WINNERS = ("a", "b", "tie", "both_bad")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    system: Mapped[str] = mapped_column(Text, default="")
    rater: Mapped[str] = mapped_column(String(64), default="", index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation", order_by="Message.idx", cascade="all, delete-orphan"
    )


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(String(100), default="")
    rating: Mapped[int] = mapped_column(Integer, default=0)  # thumbs: +1 / -1 / 0 = none
    rating_reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    conversation: Mapped[Conversation] = relationship(back_populates="messages")


class Vote(Base):
    """One compare-mode judgement: two answers to one prompt, which was better."""

    __tablename__ = "votes"
    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    prompt: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # the messages, system message included
    answer_a: Mapped[str] = mapped_column(Text)
    answer_b: Mapped[str] = mapped_column(Text)
    model_a: Mapped[str] = mapped_column(String(100))
    model_b: Mapped[str] = mapped_column(String(100))
    sampling: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seed_a: Mapped[int | None] = mapped_column(Integer, nullable=True)
    seed_b: Mapped[int | None] = mapped_column(Integer, nullable=True)
    a_left: Mapped[bool] = mapped_column(Boolean)  # the position answer A was shown in
    winner: Mapped[str] = mapped_column(String(10))  # a | b | tie | both_bad
    rater: Mapped[str] = mapped_column(String(64), index=True)
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id"), nullable=True)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    path: Mapped[str] = mapped_column(Text)
    registered_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


class Promotion(Base):
    """Promotion history of model versions: the active version is the newest one not rolled back."""

    __tablename__ = "promotions"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(100))
    promoted_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    rolled_back_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    by: Mapped[str] = mapped_column(String(100), default="")


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings so a key can be recognised
    rate_limit_rpm: Mapped[int] = mapped_column(Integer, default=0)  # 0 = the server's default
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


MAX_RATE_LIMIT_RPM = 2**31 - 1  # the rate_limit_rpm column is a 32-bit integer on PostgreSQL


def api_key_problem(name: Any, rate_limit_rpm: Any) -> tuple[str, str] | None:
    """(field, message) for a key the server must refuse, else None. A negative limit used to pass and
    mean "unlimited" (the limiter treats <= 0 as off); one above 2**31 - 1 overflowed PostgreSQL's column."""
    rpm = rate_limit_rpm
    if isinstance(rpm, bool) or not isinstance(rpm, int) or not 0 <= rpm <= MAX_RATE_LIMIT_RPM:
        return "rate_limit_rpm", (
            f"rate_limit_rpm: must be an integer from 0 (the server's default) to {MAX_RATE_LIMIT_RPM},"
            f" got {rpm!r}"
        )
    if not isinstance(name, str) or not 0 < len(name) <= 100:
        return "name", "name: 1 to 100 characters"
    return None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Database:
    """A SQLAlchemy engine + sessions, with the few queries the server and the feedback tools need."""

    def __init__(self, url: str = "sqlite://", rater_salt: str = "chatforge") -> None:
        self.url = url
        self.rater_salt = rater_salt
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # The server touches the DB from a thread pool; an in-memory DB must be one shared connection.
            kwargs["connect_args"] = {"check_same_thread": False}
            if url in ("sqlite://", "sqlite:///:memory:"):
                kwargs["poolclass"] = StaticPool
        try:
            self.engine = create_engine(url, **kwargs)
        except (SQLAlchemyError, ValueError) as e:  # bad URL, or its driver is not installed
            raise ChatforgeError(f"db_url {url!r}: {str(e).splitlines()[0]}") from None
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as e:
            raise ChatforgeError(
                f"db_url {url!r}: cannot open the database ({str(e).splitlines()[0]})"
            ) from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()

    def rater_id(self, raw: str) -> str:
        """A pseudonymous, stable id for what the browser sent (never stored as given)."""
        return hashlib.sha256(f"{self.rater_salt}:{raw}".encode()).hexdigest()[:16] if raw else ""

    # ---------------------------------------------------------------- model versions

    def register_version(self, name: str, path: str) -> None:
        with self.session() as s:
            row = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
            if row is None:
                s.add(ModelVersion(name=name, path=path))
            else:
                row.path = path

    def versions(self) -> list[ModelVersion]:
        with self.session() as s:
            return list(s.scalars(select(ModelVersion).order_by(ModelVersion.id)))

    def promotion_stack(self) -> list[Promotion]:
        with self.session() as s:
            q = select(Promotion).where(Promotion.rolled_back_at.is_(None)).order_by(Promotion.id)
            return list(s.scalars(q))

    def promotion_history(self) -> list[Promotion]:
        with self.session() as s:
            return list(s.scalars(select(Promotion).order_by(Promotion.id)))

    def promote(self, name: str, by: str = "") -> None:
        with self.session() as s:
            s.add(Promotion(version=name, by=by))

    def rollback(self, loaded: Collection[str] | None = None) -> str:
        """Go back to the version promoted before the active one; returns it.

        The active version is the newest promotion not rolled back (among ``loaded`` versions, when
        given: what a server can serve). Every promotion newer than the previous *other* version's is
        rolled back, so a version promoted twice in a row does not make a rollback a no-op, and a
        server never rolls back to a version it has not loaded (which would leave it with no active
        version at all): that is refused, and nothing changes.
        """
        with self.session() as s:
            q = select(Promotion).where(Promotion.rolled_back_at.is_(None)).order_by(Promotion.id.desc())
            stack = list(s.scalars(q))
            live = [p for p in stack if loaded is None or p.version in loaded]
            current = live[0].version if live else None
            target = next((p for p in live if p.version != current), None)
            if target is None:
                earlier = next((p.version for p in stack if p.version != current), None)
                if earlier is not None:
                    raise ChatforgeError(
                        f"cannot roll back to {earlier!r}: it is not loaded on this server"
                        " (add it with POST /admin/versions first)"
                    )
                raise ChatforgeError("nothing to roll back to: there is no earlier promotion")
            now = _now()
            for p in stack:
                if p.id > target.id:
                    p.rolled_back_at = now
            return target.version

    # ---------------------------------------------------------------- API keys

    def create_api_key(self, name: str, rate_limit_rpm: int = 0) -> str:
        """A new key (returned once; only its hash is stored). ``rate_limit_rpm`` 0 = the server's
        default; raises ValueError for a limit or name the columns cannot hold."""
        problem = api_key_problem(name, rate_limit_rpm)
        if problem is not None:
            raise ValueError(problem[1])
        key = "sk-cf-" + secrets.token_urlsafe(24)
        with self.session() as s:
            s.add(ApiKey(name=name, key_hash=hash_key(key), prefix=key[:10], rate_limit_rpm=rate_limit_rpm))
        return key

    def find_api_key(self, key: str) -> ApiKey | None:
        with self.session() as s:
            q = select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked.is_(False))
            return s.scalar(q)

    def has_api_keys(self) -> bool:
        with self.session() as s:
            return s.scalar(select(ApiKey.id).where(ApiKey.revoked.is_(False)).limit(1)) is not None

    def revoke_api_key(self, prefix: str) -> int:
        with self.session() as s:
            rows = list(s.scalars(select(ApiKey).where(ApiKey.prefix == prefix)))
            for r in rows:
                r.revoked = True
            return len(rows)

    # ---------------------------------------------------------------- conversations

    def save_conversation(
        self,
        conv_id: int | None,
        title: str,
        system: str,
        messages: list[dict[str, Any]],
        rater: str = "",
    ) -> int:
        """Create or replace a conversation (the browser sends the whole thread after each turn).

        Thumbs on messages that are kept (same index, role and content) survive the rewrite, so a
        regenerate or an edit only drops the ratings of what it replaced.
        """
        with self.session() as s:
            conv = s.get(Conversation, conv_id) if conv_id is not None else None
            if conv_id is not None and conv is None:
                raise KeyError(conv_id)
            if conv is None:
                conv = Conversation(rater=rater)
                s.add(conv)
            old = {(m.idx, m.role, m.content): (m.rating, m.rating_reason) for m in conv.messages}
            conv.title, conv.system, conv.updated_at = title[:200], system, _now()
            conv.messages.clear()
            s.flush()
            for i, m in enumerate(messages):
                rating, reason = old.get((i, m["role"], m["content"]), (0, ""))
                conv.messages.append(
                    Message(
                        idx=i,
                        role=m["role"],
                        content=m["content"],
                        model_version=m.get("model") or "",
                        rating=rating,
                        rating_reason=reason,
                    )
                )
            s.flush()
            return conv.id

    def conversation(self, conv_id: int) -> dict[str, Any] | None:
        with self.session() as s:
            conv = s.get(Conversation, conv_id)
            if conv is None:
                return None
            return {
                "id": conv.id,
                "title": conv.title,
                "system": conv.system,
                "messages": [
                    {
                        "role": m.role,
                        "content": m.content,
                        "model": m.model_version,
                        "rating": m.rating,
                        "rating_reason": m.rating_reason,
                    }
                    for m in conv.messages
                ],
            }

    def conversations(self, rater: str = "", limit: int = 100) -> list[dict[str, Any]]:
        with self.session() as s:
            q = select(Conversation).order_by(Conversation.updated_at.desc()).limit(limit)
            if rater:
                q = q.where(Conversation.rater == rater)
            return [
                {"id": c.id, "title": c.title, "updated_at": c.updated_at.isoformat()} for c in s.scalars(q)
            ]

    def has_conversation(self, conv_id: int) -> bool:
        with self.session() as s:
            return s.get(Conversation, conv_id) is not None

    def delete_conversation(self, conv_id: int) -> bool:
        """Delete a conversation and its messages; its compare-mode votes are kept (they are training
        data, and stand on their own: each stores its whole prompt), only unlinked from it."""
        with self.session() as s:
            conv = s.get(Conversation, conv_id)
            if conv is None:
                return False
            s.execute(update(Vote).where(Vote.conversation_id == conv_id).values(conversation_id=None))
            s.delete(conv)
            return True

    def rate_message(self, conv_id: int, idx: int, rating: int, reason: str = "") -> bool:
        with self.session() as s:
            q = select(Message).where(Message.conversation_id == conv_id, Message.idx == idx)
            msg = s.scalar(q)
            if msg is None or msg.role != "assistant":
                return False
            msg.rating, msg.rating_reason = rating, reason
            return True

    # ---------------------------------------------------------------- votes

    def add_vote(self, **fields: Any) -> int:
        if fields.get("winner") not in WINNERS:
            raise ValueError(f"winner must be one of {', '.join(WINNERS)}")
        with self.session() as s:
            v = Vote(**fields)
            s.add(v)
            s.flush()
            return v.id

    def votes(self) -> list[Vote]:
        with self.session() as s:
            return list(s.scalars(select(Vote).order_by(Vote.id)))


def _sqlite_pragmas(conn: Any, _record: Any) -> None:
    cur = conn.cursor()
    # WAL: the feedback CLI can read while the server writes; foreign keys are off by default in SQLite.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
