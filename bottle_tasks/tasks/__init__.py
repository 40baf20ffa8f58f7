"""Task creators. dodo.py and the `bottle` console command load exactly these, plus the creators of each
registered backend's own stages (its `task_module`; smolmachines: the pack pipeline)."""

import importlib

from bottle_tasks.backends import BACKENDS, backend_class
from bottle_tasks.tasks.bottle import *  # noqa: F401,F403
from bottle_tasks.tasks.config import DOIT_CONFIG  # noqa: F401
from bottle_tasks.tasks.images import *  # noqa: F401,F403
from bottle_tasks.tasks.observe import *  # noqa: F401,F403
from bottle_tasks.tasks.policy import *  # noqa: F401,F403
from bottle_tasks.tasks.start import *  # noqa: F401,F403
from bottle_tasks.tasks.supervise import *  # noqa: F401,F403

for _name in BACKENDS:
    if backend_class(_name).task_module:
        _module = importlib.import_module(backend_class(_name).task_module)
        globals().update({creator: getattr(_module, creator) for creator in _module.__all__})
