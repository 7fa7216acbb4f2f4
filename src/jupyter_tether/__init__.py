"""jupyter-tether: run work on a remote Jupyter Server through one persistent, resilient link.

    import jupyter_tether
    with jupyter_tether.connect("https://host/...", token="...") as t:  # or a target's name
        print(t.exec("import torch; torch.cuda.is_available()").raise_for_error().value)

``help(jupyter_tether.connect)`` says which server is chosen when none is named.
"""

from .controller.blocking import Tether, connect
from .controller.blocking_services import Files, Job, Jobs
from .controller.execute import ExecResult
from .controller.files import DEFAULT_SYNC_MAX_BYTES, ProgressCallback
from .controller.forward import BlockingPortForward, PortForward
from .controller.jobs import AsyncJob, JobInfo
from .controller.link import LinkOptions
from .controller.submit import SubmitProgress
from .controller.submit import validate_spec as validate_job_spec
from .controller.target import Target, parse_target
from .controller.tether import AsyncTether
from .errors import (
    AuthError,
    ConfigError,
    ConnectionLost,
    ExecError,
    InvalidArgument,
    JobError,
    KernelError,
    LimitExceeded,
    NotFound,
    RemoteError,
    ServerError,
    TetherError,
    TetherTimeout,
    TransferError,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SYNC_MAX_BYTES",
    "AsyncJob",
    "AsyncTether",
    "AuthError",
    "BlockingPortForward",
    "ConfigError",
    "ConnectionLost",
    "ExecError",
    "ExecResult",
    "Files",
    "InvalidArgument",
    "Job",
    "JobError",
    "JobInfo",
    "Jobs",
    "KernelError",
    "LimitExceeded",
    "LinkOptions",
    "NotFound",
    "PortForward",
    "ProgressCallback",
    "RemoteError",
    "ServerError",
    "SubmitProgress",
    "Target",
    "Tether",
    "TetherError",
    "TetherTimeout",
    "TransferError",
    "__version__",
    "connect",
    "parse_target",
    "validate_job_spec",
]
