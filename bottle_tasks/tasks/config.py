"""DOIT_CONFIG for the bottle (reference/doit.md section 0 lists why each key is set)."""

from bottle_tasks.reporter import BottleReporter
from bottle_tasks.settings import Settings

_cache = Settings.from_env().cache_dir
_cache.mkdir(parents=True, exist_ok=True)

DOIT_CONFIG = {
    "default_tasks": ["start"],
    "backend": "sqlite3",                # concurrent doit runs must not corrupt the dep DB
    "dep_file": str(_cache / "doit.sqlite3"),
    "par_type": "thread",
    "cleanforget": True,
    "cleandep": True,
    "verbosity": 1,
    "action_string_formatting": "new",
    "reporter": BottleReporter,          # doit's console output, then the time each stage took
}
