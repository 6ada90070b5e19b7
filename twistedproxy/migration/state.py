"""
Where a coordinator keeps its migrations across restarts: one JSON file per
pool, C{cacheproxy-migration-POOL.json} in the state directory (L{FileStore},
for the master and the single process), or a dict (L{MemoryStore}, for an
embedded proxy).  An entry is the coordinator's own JSON-safe dict
(L{twistedproxy.migration.coordinator}); the store only keeps it.
"""

from __future__ import annotations

import json
import os

PREFIX = "cacheproxy-migration-"
SUFFIX = ".json"


def file_store(config, config_path: str) -> "FileStore":
    """The store of the configuration C{config} read from C{config_path}: in its state directory."""
    return FileStore(state_dir(config, config_path))


def state_dir(config, config_path: str) -> str:
    """The state directory of C{config}: C{global: state_dir}, or the directory of its file C{config_path}."""
    configured = config.global_.state_dir
    if configured:
        return os.path.join(os.path.dirname(os.path.abspath(config_path)), os.path.expanduser(configured))
    return os.path.dirname(os.path.abspath(config_path))


class MemoryStore:
    """Entries in memory: an embedded proxy's migrations last as long as it does."""

    def __init__(self):
        self.entries = {}

    def load(self) -> dict:
        """pool name -> entry, of every pool with a migration record."""
        return json.loads(json.dumps(self.entries))

    def save(self, pool: str, entry: dict) -> None:
        self.entries[pool] = json.loads(json.dumps(entry))

    def remove(self, pool: str) -> None:
        self.entries.pop(pool, None)


class FileStore:
    """Entries as files in C{directory}, each replaced whole (written aside, then renamed over)."""

    def __init__(self, directory: str):
        self.directory = directory

    def path(self, pool: str) -> str:
        return os.path.join(self.directory, PREFIX + pool + SUFFIX)

    def load(self) -> dict:
        """
        pool name -> entry, of every state file in the directory (none if it
        does not exist yet); an unreadable file raises ValueError naming it.
        """
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return {}
        entries = {}
        for name in names:
            if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
                continue
            path = os.path.join(self.directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    entry = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError("migration state file %s cannot be read: %s" % (path, e))
            entries[name[len(PREFIX):-len(SUFFIX)]] = entry
        return entries

    def save(self, pool: str, entry: dict) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(pool)
        aside = path + ".new"
        with open(aside, "w", encoding="utf-8") as f:
            json.dump(entry, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(aside, path)

    def remove(self, pool: str) -> None:
        try:
            os.unlink(self.path(pool))
        except FileNotFoundError:
            pass
