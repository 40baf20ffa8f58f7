"""The supervise store: approval requests and human decisions as files in one state dir.

Shared by the ``supervise`` daemon (in the bundle, which mounts the host state dir at
``/var/lib/bottle/supervise``) and the host command (``bottle_tasks.supervise_cli``), which
decides without the bundle running. Layout (docs/bundle-contract.md, "supervise")::

    <state_dir>/requests/<id>.json    {"id", "tool", "input", "summary", "timeout_seconds",
                                       "created_at", "expires_at"}         written by the daemon
    <state_dir>/decisions/<id>.json   {"decision": "approve"|"deny", "by", "reason",
                                       "decided_at", ["scope": "once"|"always"]}   written by the host
    <state_dir>/expired/<id>.json     {"expired_at"}: marks that the expiry was recorded
    <state_dir>/history.jsonl         one line per request, decision and expiry

Files hold the agent's tool input, so every file is 0600 and every directory 0700: only the
owner reads them. That owner is the host user: the host creates the state dir, and the daemon
switches to the dir's owner before it serves (``state_dir_owner``, ``become``), so what it writes
belongs to the host user too (the bundle may not chown). Another root process (git-gate) gets the
same: ``create_request`` writes through a forked child that has become the owner, and ``get``
leaves recording an expiry to the owner.

Every file is written to a temp file in the same directory and then renamed into place, so a
reader never sees half a file. A decision is published with ``link()``, which refuses to
replace an existing file: of two hosts deciding at once exactly one wins, the other gets
``AlreadyDecided``. Ids are random and URL-safe; times are ISO-8601 UTC (``...Z``).

Status of a request: ``approved``/``denied`` when a decision made before ``expires_at``
exists; ``expired`` once ``expires_at`` plus a short grace has passed with none (recorded in
history once, whichever process notices first); ``pending`` otherwise. ``decide`` refuses
after ``expires_at``; the grace covers a decision being written at the last moment.

Admission: ``create_request`` refuses (``TooManyRequests``) while ``max_pending`` requests are
pending, or when ``max_per_minute`` requests were created in the last 60 s, counted from the files,
so every process creating requests (the daemon, git-gate) shares the same limits.

Nothing is kept in memory: a restarted daemon, or a host command run while the bundle is down,
sees exactly the same state. Standard library only.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from bottle_tasks.contract import SupervisePolicy
from bottle_tasks.sidecars.files import atomic_write_json, open_regular, tighten_mode

Decision = Literal["approve", "deny"]
Status = Literal["pending", "approved", "denied", "expired"]

DECISIONS: tuple[str, ...] = ("approve", "deny")
# How far an approval reaches: this one request, or (egress's held requests) the host from now on, which
# the host has put in the policy overlay (overlay.py) before it writes the decision.
SCOPES: tuple[str, ...] = ("once", "always")
STATUS_OF_DECISION: dict[str, Status] = {"approve": "approved", "deny": "denied"}
MIN_TIMEOUT_S = 1
MAX_TIMEOUT_S = 3600
MAX_TOOL_CHARS = 200
MAX_SUMMARY_CHARS = 2000
MAX_BY_CHARS = 200
MAX_REASON_CHARS = 2000
# A request is reported expired this long after expires_at, so a decide() that passed its
# deadline check just before expires_at has time to land its file.
EXPIRY_GRACE_S = 1.0
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
FILE_MODE = 0o600  # tool input: the owner (the host user, whom the daemon becomes) only
DIR_MODE = 0o700
DEFAULT_MAX_PENDING: int = SupervisePolicy.max_pending                # waiting for a human at once
DEFAULT_MAX_PER_MINUTE: int = SupervisePolicy.max_requests_per_minute  # created in any 60 s
RATE_WINDOW_S = 60.0


# Who files requests: the guest through the daemon's HTTP API, git-gate in the bundle (held pushes), or
# egress (held requests to a host no route names, network.unknown_hosts: ask). The daemon never lets
# the guest choose; the host shows it, so a guest cannot pass its request off as the bundle's.
SOURCES = ("guest", "git-gate", "egress")


class SuperviseError(Exception):
    """A one-line, user-facing error."""


class UnknownRequest(SuperviseError):
    pass


class AlreadyDecided(SuperviseError):
    pass


class RequestExpired(SuperviseError):
    pass


class InvalidArgument(SuperviseError, ValueError):
    pass


class TooManyRequests(SuperviseError):
    """Over the pending cap or the rate limit; retry_after: seconds until one may fit (a guess)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = max(1.0, retry_after)


# --------------------------------------------------------------------------- time


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    """2025-01-31T12:00:00.123Z"""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------- files


def publish_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write path whole, on disk, readable by both uids; FileExistsError if it exists (first writer wins)."""
    atomic_write_json(path, document, exclusive=True, fsync=True, mode=FILE_MODE)


# The bundle can write this dir: a link, a FIFO or an endless file planted here must not make the host
# read another file, hang or fill its memory. No writer makes a file this large (the daemon's body cap).
MAX_FILE_BYTES = 1 << 20


def read_json(path: Path) -> dict[str, Any] | None:
    """The document at path, or None when it does not exist. Corrupt files (a link, not a regular
    file, too large, not JSON) raise SuperviseError."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise SuperviseError(f"{path}: not readable by uid {os.geteuid()} (files here are 0600, "
                             "and must be written by the state dir's owner)") from None
    except OSError as error:
        raise SuperviseError(f"{path}: not a file the supervise store wrote (a link, a FIFO...: {error.strerror}); "
                             "remove it") from None
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise SuperviseError(f"{path}: larger than {MAX_FILE_BYTES} bytes, which no supervise file is; remove it")
    try:
        document = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise SuperviseError(f"{path}: not valid JSON") from None
    if not isinstance(document, dict):
        raise SuperviseError(f"{path}: expected a JSON object")
    return document


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Request:
    id: str
    tool: str
    input: dict[str, Any]
    summary: str
    timeout_seconds: int
    created_at: str
    expires_at: str
    status: Status = "pending"
    by: str = ""
    reason: str = ""
    decided_at: str = ""
    source: str = "guest"   # who filed it: "guest" (the agent, through the daemon), "git-gate" or "egress" (the bundle)
    scope: str = ""         # an approval's reach, one of SCOPES; "" when the decision does not say

    @property
    def pending(self) -> bool:
        return self.status == "pending"

    def seconds_left(self, now: datetime | None = None) -> float:
        return (parse_iso(self.expires_at) - (now or utc_now())).total_seconds()

    def age_seconds(self, now: datetime | None = None) -> float:
        return ((now or utc_now()) - parse_iso(self.created_at)).total_seconds()

    def api(self) -> dict[str, Any]:
        """The daemon's GET answer (contract fields plus expires_at)."""
        return {"id": self.id, "status": self.status, "reason": self.reason, "by": self.by,
                "decided_at": self.decided_at or None, "expires_at": self.expires_at}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_request_fields(tool: Any, input: Any, summary: Any, timeout_seconds: Any) -> None:
    """Raise InvalidArgument naming the first bad field (the daemon's 400 message)."""
    if not isinstance(tool, str) or not tool.strip():
        raise InvalidArgument("tool must be a non-empty string")
    if len(tool) > MAX_TOOL_CHARS:
        raise InvalidArgument(f"tool must be at most {MAX_TOOL_CHARS} characters")
    if not isinstance(input, dict):
        raise InvalidArgument("input must be a JSON object")
    if not isinstance(summary, str):
        raise InvalidArgument("summary must be a string")
    if len(summary) > MAX_SUMMARY_CHARS:
        raise InvalidArgument(f"summary must be at most {MAX_SUMMARY_CHARS} characters")
    if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, int) \
            or not MIN_TIMEOUT_S <= timeout_seconds <= MAX_TIMEOUT_S:
        raise InvalidArgument(f"timeout_seconds must be an integer from {MIN_TIMEOUT_S} to {MAX_TIMEOUT_S}")


def check_id(request_id: Any) -> str:
    if not isinstance(request_id, str) or not ID_PATTERN.match(request_id):
        raise UnknownRequest(f"unknown request id {str(request_id)[:80]!r}")
    return request_id


# --------------------------------------------------------------------------- store


@dataclass
class Store:
    state_dir: Path
    clock: Callable[[], datetime] = field(default=utc_now, repr=False)
    _history_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    max_pending: int | None = DEFAULT_MAX_PENDING        # None: no cap
    max_per_minute: int | None = DEFAULT_MAX_PER_MINUTE  # None: no rate limit
    _create_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    audit: Any = field(default=None, repr=False)   # an audit.AuditWriter: history lines go to the stream too

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)

    # paths
    @property
    def requests_dir(self) -> Path:
        return self.state_dir / "requests"

    @property
    def decisions_dir(self) -> Path:
        return self.state_dir / "decisions"

    @property
    def expired_dir(self) -> Path:
        return self.state_dir / "expired"

    @property
    def history_path(self) -> Path:
        return self.state_dir / "history.jsonl"

    def ensure_layout(self) -> "Store":
        """Create the directories (0700) and history.jsonl (0600), and tighten them where an
        older version left them readable. The host calls this before the bundle starts, so they
        belong to the host user; the daemon then runs as that user (``become``)."""
        for directory in (self.state_dir, self.requests_dir, self.decisions_dir, self.expired_dir):
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            if directory.is_symlink():  # the bundle writes here: a planted link must not steer the host's files
                raise SuperviseError(f"{directory}: a symbolic link, not the store's directory; remove it")
            tighten_mode(directory, DIR_MODE)
        fd = open_regular(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        os.close(fd)
        tighten_mode(self.history_path, FILE_MODE)
        return self

    def append_history(self, record: Mapping[str, Any]) -> None:
        """One JSON line, written with a single O_APPEND write so concurrent writers interleave
        whole lines."""
        line = (json.dumps(dict(record), ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8")
        with self._history_lock:
            # O_NOFOLLOW: a link the bundle put here must not make the host append (the agent's words) elsewhere.
            fd = open_regular(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        if self.audit is not None:
            event, decision, fields = _audit_line(record)
            self.audit.emit(event, decision, **fields)

    def history(self) -> list[dict[str, Any]]:
        try:
            lines = self.history_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    # operations
    def create_request(self, tool: str, input: dict[str, Any], summary: str, timeout_seconds: int,
                       source: str = "guest", request_id: str | None = None) -> Request:
        """A new pending request. TooManyRequests when max_pending of the same source are pending or
        max_per_minute of it were created in the last minute (by any process using this state dir).
        Each source has its own quota, so a guest flooding the queue cannot crowd out git-gate.
        request_id: the bundle's own id for it (egress's request id, which its audit line and 403 name);
        the guest's requests always get a fresh one."""
        validate_request_fields(tool, input, summary, timeout_seconds)
        if source not in SOURCES:
            raise InvalidArgument(f"source must be one of {', '.join(SOURCES)}")
        if request_id is not None and not ID_PATTERN.match(request_id):
            raise InvalidArgument("request_id must be 8 to 64 letters, digits, '-' or '_'")
        owner = state_dir_owner(self.state_dir)
        if owner is not None:  # root (git-gate in the bundle): the file must still be the host user's
            return self._create_as(owner, tool, input, summary, timeout_seconds, source, request_id)
        self.ensure_layout()
        with self._create_lock, _dir_lock(self.requests_dir):
            self._admit(source)
            return self._create(tool, input, summary, timeout_seconds, source, request_id)

    def _create_as(self, owner: tuple[int, int], tool: str, input: dict[str, Any], summary: str,
                   timeout_seconds: int, source: str, request_id: str | None = None) -> Request:
        """create_request in a forked child that has become the state dir's owner (a root process
        cannot chown here); its answer, or its error, comes back through a pipe."""
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the forked child (tested through create_request as root)
            answer: dict[str, Any]
            try:
                os.close(read_end)
                os.chdir(self.state_dir)  # the dir's parents may be root's alone
                become(*owner)
                store = Store(Path("."), clock=self.clock, max_pending=self.max_pending,
                              max_per_minute=self.max_per_minute, audit=self.audit)
                answer = {"request": store.create_request(tool, input, summary, timeout_seconds, source,
                                                          request_id).as_dict()}
            except TooManyRequests as error:
                answer = {"error": "TooManyRequests", "message": str(error), "retry_after": error.retry_after}
            except BaseException as error:
                answer = {"error": type(error).__name__, "message": f"{error}"[:1000]}
            try:
                data = json.dumps(answer).encode("utf-8")
                while data:
                    data = data[os.write(write_end, data):]
            finally:
                os._exit(0)
        os.close(write_end)
        chunks = []
        with os.fdopen(read_end, "rb") as pipe:
            chunks.append(pipe.read())
        os.waitpid(child, 0)
        try:
            answer = json.loads(b"".join(chunks).decode("utf-8"))
        except ValueError:
            raise SuperviseError(f"creating the request as uid {owner[0]} failed without an answer") from None
        if "request" in answer:
            return Request(**answer["request"])
        if answer.get("error") == "TooManyRequests":
            raise TooManyRequests(answer["message"], float(answer.get("retry_after", 1.0)))
        if answer.get("error") == "InvalidArgument":
            raise InvalidArgument(answer["message"])
        raise SuperviseError(f"creating the request as uid {owner[0]}: {answer.get('error')}: {answer.get('message')}")

    def _admit(self, source: str = "guest") -> None:
        if self.max_pending is None and self.max_per_minute is None:
            return
        now = self.clock()
        if self.max_per_minute is not None:
            recent = self._created_within(now, RATE_WINDOW_S, source)
            if len(recent) >= self.max_per_minute:
                retry = RATE_WINDOW_S - (now - min(recent)).total_seconds()
                raise TooManyRequests(
                    f"too many supervise requests: {len(recent)} in the last {int(RATE_WINDOW_S)} s "
                    f"(at most {self.max_per_minute} a minute); wait before asking again", retry)
        if self.max_pending is not None:
            pending = self.count_pending(source)
            if pending >= self.max_pending:
                raise TooManyRequests(
                    f"too many supervise requests: {pending} are already waiting for a human (at most "
                    f"{self.max_pending}); wait until they are decided or expire", 5.0)

    def _ids(self, directory: Path) -> set[str]:
        try:
            return {entry.name[:-5] for entry in os.scandir(directory)
                    if entry.name.endswith(".json") and ID_PATTERN.match(entry.name[:-5])}
        except FileNotFoundError:
            return set()

    def count_pending(self, source: str | None = None) -> int:
        """How many requests (of source, or of any) are pending; only those without a decision or
        expiry file are read (and an expiry found on the way is recorded)."""
        undecided = self._ids(self.requests_dir) - self._ids(self.decisions_dir) - self._ids(self.expired_dir)
        count = 0
        for request_id in undecided:
            try:
                request = self.get(request_id)
            except SuperviseError:
                continue
            count += request.pending and (source is None or request.source == source)
        return count

    def _created_within(self, now: datetime, seconds: float, source: str | None = None) -> list[datetime]:
        """created_at of the requests made in the last ``seconds``; files older than that by their
        mtime (plus a margin) are not even read."""
        horizon = time.time() - seconds - 10.0
        created = []
        try:
            entries = [entry for entry in os.scandir(self.requests_dir) if entry.name.endswith(".json")]
        except FileNotFoundError:
            return []
        for entry in entries:
            try:
                if entry.stat().st_mtime < horizon:
                    continue
                document = read_json(Path(entry.path)) or {}
                moment = parse_iso(str(document["created_at"]))
            except (OSError, KeyError, ValueError, SuperviseError):
                continue
            if source is not None and document.get("source", "guest") != source:
                continue
            if (now - moment).total_seconds() < seconds:
                created.append(moment)
        return created

    def _create(self, tool: str, input: dict[str, Any], summary: str, timeout_seconds: int,
                source: str = "guest", request_id: str | None = None) -> Request:
        now = self.clock()
        request = Request(
            id=request_id or secrets.token_urlsafe(12), tool=tool, input=dict(input), summary=summary,
            timeout_seconds=timeout_seconds, created_at=iso(now),
            expires_at=iso(now + timedelta(seconds=timeout_seconds)), source=source,
        )
        document = {key: value for key, value in request.as_dict().items()
                    if key in ("id", "tool", "input", "summary", "timeout_seconds", "created_at", "expires_at",
                               "source")}
        publish_json(self.requests_dir / f"{request.id}.json", document)
        self.append_history({"event": "request", "id": request.id, "at": request.created_at, "source": source,
                             "tool": tool,
                             "summary": summary, "timeout_seconds": timeout_seconds,
                             "expires_at": request.expires_at})
        return request

    def _load_request(self, request_id: str) -> dict[str, Any]:
        document = read_json(self.requests_dir / f"{check_id(request_id)}.json")
        if document is None:
            raise UnknownRequest(f"unknown request id {request_id!r}")
        return document

    def get(self, request_id: str) -> Request:
        """The request with its current status; records the expiry in history the first time
        any process sees it."""
        document = self._load_request(request_id)
        try:
            request = Request(
                id=str(document["id"]), tool=str(document["tool"]), input=dict(document["input"]),
                summary=str(document.get("summary", "")), timeout_seconds=int(document["timeout_seconds"]),
                created_at=str(document["created_at"]), expires_at=str(document["expires_at"]),
                source=str(document.get("source", "guest")),
            )
            expires = parse_iso(request.expires_at)
        except (KeyError, TypeError, ValueError):
            raise SuperviseError(f"request {request_id}: malformed request file") from None

        decision = read_json(self.decisions_dir / f"{request_id}.json")
        if decision is not None and decision.get("decision") in DECISIONS:
            decided_at = str(decision.get("decided_at", ""))
            try:
                in_time = parse_iso(decided_at) <= expires
            except ValueError:
                in_time = False
            if in_time:
                return _with(request, status=STATUS_OF_DECISION[decision["decision"]],
                             by=str(decision.get("by", "")), reason=str(decision.get("reason", "")),
                             decided_at=decided_at, scope=str(decision.get("scope", "")))

        marker = self.expired_dir / f"{request_id}.json"
        if marker.exists():
            return self._expired(request)
        if self.clock() < expires + timedelta(seconds=EXPIRY_GRACE_S):
            return request
        if state_dir_owner(self.state_dir) is not None:
            return self._expired(request)  # root (git-gate) leaves the record to the owner: files stay theirs
        try:
            self.ensure_layout()   # refuses an expired/ the bundle swapped for a link
            publish_json(marker, {"expired_at": request.expires_at})
        except FileExistsError:
            pass  # another process recorded it
        else:
            self.append_history({"event": "expired", "id": request_id, "at": iso(self.clock()),
                                 "tool": request.tool, "expires_at": request.expires_at,
                                 "reason": _expiry_reason(request)})
        return self._expired(request)

    @staticmethod
    def _expired(request: Request) -> Request:
        return _with(request, status="expired", by="", reason=_expiry_reason(request),
                     decided_at=request.expires_at)

    def list_pending(self) -> list[Request]:
        """Pending requests, oldest first. Requests that just expired are recorded and left out."""
        pending = []
        try:
            names = sorted(path.stem for path in self.requests_dir.glob("*.json"))
        except FileNotFoundError:
            return []
        for name in names:
            if not ID_PATTERN.match(name):
                continue
            try:
                request = self.get(name)
            except SuperviseError:
                continue
            if request.pending:
                pending.append(request)
        return sorted(pending, key=lambda request: request.created_at)

    def require_pending(self, request_id: str) -> Request:
        """The request, if it still waits for a decision; RequestExpired or AlreadyDecided otherwise."""
        request = self.get(request_id)
        if request.status == "expired":
            raise RequestExpired(f"request {request_id} expired at {request.expires_at} with no decision")
        if request.status != "pending":
            raise AlreadyDecided(f"request {request_id} was already {request.status} by {request.by or 'someone'}"
                                 f" at {request.decided_at}")
        return request

    def decide(self, request_id: str, decision: str, by: str, reason: str = "", scope: str | None = None) -> Request:
        """Approve or deny a pending request; returns it with its new status. scope (approvals only):
        one of SCOPES, recorded in the decision file; None records none."""
        if decision not in DECISIONS:
            raise InvalidArgument(f"decision must be approve or deny, not {decision!r}")
        if not isinstance(by, str) or not by.strip():
            raise InvalidArgument("by (who decides) must be a non-empty string")
        if len(by) > MAX_BY_CHARS:
            raise InvalidArgument(f"by must be at most {MAX_BY_CHARS} characters")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            raise InvalidArgument(f"reason must be a string of at most {MAX_REASON_CHARS} characters")
        if scope is not None and (scope not in SCOPES or decision != "approve"):
            raise InvalidArgument(f"scope must be one of {', '.join(SCOPES)}, and only for an approval")
        request = self.require_pending(request_id)
        now = self.clock()
        if now > parse_iso(request.expires_at):
            raise RequestExpired(f"request {request_id} expired at {request.expires_at} with no decision")
        record = {"decision": decision, "by": by.strip(), "reason": reason.strip(), "decided_at": iso(now),
                  **({"scope": scope} if scope else {})}
        self.ensure_layout()
        try:
            publish_json(self.decisions_dir / f"{request_id}.json", record)
        except FileExistsError:
            current = self.get(request_id)
            raise AlreadyDecided(f"request {request_id} was already {current.status} by {current.by or 'someone'}"
                                 f" at {current.decided_at}") from None
        self.append_history({"event": "decision", "id": request_id, "at": record["decided_at"],
                             "tool": request.tool, "decision": decision, "by": record["by"],
                             "reason": record["reason"], **({"scope": scope} if scope else {})})
        return _with(request, status=STATUS_OF_DECISION[decision], by=record["by"], reason=record["reason"],
                     decided_at=record["decided_at"], scope=scope or "")


class _dir_lock:
    """flock on a directory: one creator at a time across processes (the daemon, git-gate)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fd = -1

    def __enter__(self) -> "_dir_lock":
        self.fd = os.open(self.directory, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)  # releases the lock


# --------------------------------------------------------------------------- whose files


def state_dir_owner(state_dir: Path | str, *, euid: int | None = None,
                    stat: Callable[[Path | str], os.stat_result] = os.stat) -> tuple[int, int] | None:
    """The (uid, gid) a root process should become before it writes into state_dir: the dir's
    owner, which the host created. None when we are not root (nothing to switch) or the owner is
    root already (the host runs as root, or a user namespace maps the host user to root)."""
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    try:
        info = stat(state_dir)
    except FileNotFoundError:
        return None  # not mounted: created by us, as we are
    if info.st_uid == 0:
        return None
    return info.st_uid, info.st_gid


def become(uid: int, gid: int) -> None:
    """Switch this process to uid/gid for good (needs CAP_SETUID/CAP_SETGID). Groups first, then
    the gid, then the uid, all three ids of each, so root cannot be regained."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError(f"could not switch to uid {uid} gid {gid}")


def _audit_line(record: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """A history record as the audit stream's (event, decision, fields); history.jsonl stays the full record."""
    event = record.get("event")
    fields: dict[str, Any] = {"request_id": str(record.get("id", "")),
                              "detail": {"tool": record.get("tool", ""), "record": "supervise/history.jsonl"}}
    if event == "request":
        fields["detail"]["source"] = record.get("source", "guest")
        return ("approval_request", "hold", {**fields, "reason": str(record.get("summary", "")),
                                             "reason_code": "approval_requested"})
    if event == "decision":
        verdict = "approve" if record.get("decision") == "approve" else "deny"
        words = f"{record.get('by', '')}" + (f": {record['reason']}" if record.get("reason") else "")
        fields["detail"]["by"] = record.get("by", "")
        return ("decision", verdict, {**fields, "reason": words, "reason_code": f"human_{verdict}"})
    return ("expired", "expire", {**fields, "reason": str(record.get("reason", "")), "reason_code": "approval_expired"})


def _with(request: Request, **changes: Any) -> Request:
    return Request(**{**request.as_dict(), **changes})


def _expiry_reason(request: Request) -> str:
    return f"no decision within {request.timeout_seconds} s"
