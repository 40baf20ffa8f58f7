"""Task creators. dodo.py and the `bottle` console command load exactly these."""

from bottle_tasks.tasks.bottle import *  # noqa: F401,F403
from bottle_tasks.tasks.images import *  # noqa: F401,F403
from bottle_tasks.tasks.smol_images import *  # noqa: F401,F403
from bottle_tasks.tasks.start import *  # noqa: F401,F403
from bottle_tasks.tasks.supervise import *  # noqa: F401,F403
from bottle_tasks.tasks.config import DOIT_CONFIG  # noqa: F401
