"""Serving: the OpenAI-compatible API (api.py), continuous batching (scheduler.py), model versions
(versions.py), the feedback database (db.py), vote export and leaderboard (feedback.py), web UI (web/)."""
