"""Training stages, all thin layers over the one loop core in ``loop.py``."""
