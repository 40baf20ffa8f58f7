"""The corpus's template language: fake secrets, filler values and the encodings an attacker uses.

A placeholder is ``{{name}}``, ``{{name:N}}`` (a filler of size N) or either with transforms,
``{{aws_key|b64}}``, ``{{aws_key|hex|b64}}`` (applied left to right). Every value is drawn at random
for each case, so no run reuses a secret and none is ever real.

Secrets (the names in SECRETS) are tracked: every form a case sends becomes *evidence* that the
judge looks for upstream. ``half1``/``half2`` cut a form in two; the two halves are one piece of
evidence, leaked only when both arrive.

Which encodings a scanner may fairly be asked to see through: the standard, keyless ones that a
decoder can try on any text (base64 standard and URL-safe, with or without padding, hex, percent
once or twice, JSON/JavaScript escapes, HTML character references, lower case where it loses
nothing, and a value cut across two neighbouring fields or labels). Reversal, ROT13, base32, gzip and separators are just as easy
for an attacker but are any keyless transform: a scanner cannot try them all, so cases using them
are layer ``none`` (reported, not counted against the goals).
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Callable

UPPER_B32 = string.ascii_uppercase + "234567"
ALNUM = string.ascii_letters + string.digits
URLSAFE = ALNUM + "-_"
B64_CHARS = ALNUM + "+/"

PLACEHOLDER = re.compile(r"\{\{\s*([a-z][a-z0-9_]*)(?::([0-9]+))?((?:\|[a-z][a-z0-9_]*)*)\s*\}\}")


def _pick(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _private_key(rng: random.Random) -> str:
    body = base64.b64encode(rng.randbytes(600)).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END RSA PRIVATE KEY-----"


# Fake credentials in each provider's published shape. Evidence: what the judge looks for upstream.
SECRETS: dict[str, Callable[[random.Random], str]] = {
    "aws_key": lambda r: "AKIA" + _pick(r, UPPER_B32, 16),
    "aws_secret": lambda r: _pick(r, B64_CHARS, 40),
    "github_token": lambda r: "ghp_" + _pick(r, ALNUM, 36),
    "github_pat": lambda r: "github_pat_" + _pick(r, ALNUM, 22) + "_" + _pick(r, ALNUM, 59),
    "anthropic_key": lambda r: "sk-ant-api03-" + _pick(r, URLSAFE, 93) + "AA",
    "openai_key": lambda r: "sk-proj-" + _pick(r, URLSAFE, 64),
    "slack_token": lambda r: "xoxb-" + _pick(r, string.digits, 12) + "-" + _pick(r, string.digits, 13) + "-"
    + _pick(r, ALNUM, 24),
    "google_api_key": lambda r: "AIza" + _pick(r, URLSAFE, 35),
    "stripe_key": lambda r: "sk_live_" + _pick(r, ALNUM, 24),
    "gitlab_token": lambda r: "glpat-" + _pick(r, URLSAFE, 20),
    "npm_token": lambda r: "npm_" + _pick(r, ALNUM, 36),
    "private_key": _private_key,
    # Whole files holding a key at an offset that is not a multiple of three (base64 of the file
    # does not contain base64 of the key).
    "dotenv_aws": lambda r: "APP_NAME=shop\nLOG_LEVEL=info\nAWS_ACCESS_KEY_ID=" + SECRETS["aws_key"](r)
    + "\nAWS_REGION=eu-west-1\n",
    "dotenv_github": lambda r: "# deploy settings\nGITHUB_TOKEN=" + SECRETS["github_token"](r) + "\nCI=true\n",
    # Not a credential: data the agent should not send anywhere (a line of a private file). No
    # pattern can know it; only where it is sent (a hostname label) can give it away.
    "stolen_data": lambda r: _pick(r, string.ascii_lowercase + string.digits, 24),
}


def _png_b64(rng: random.Random, size: int) -> str:
    raw = b"\x89PNG\r\n\x1a\n" + rng.randbytes(max(0, size * 3 // 4 - 8))
    return base64.b64encode(raw).decode()[:size]


_WORDS = ("the quick brown fox jumps over a lazy dog while engineers review the build output and "
          "write notes about caching, latency, retries and the shape of the next release").split()


def _lorem(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(12)).capitalize() + ". "
        out.append(sentence)
        length += len(sentence)
    return "".join(out)[:size]


# Values that are not secrets: fillers and identifiers of ordinary traffic. {{name:N}} gives a size.
FILLERS: dict[str, Callable[[random.Random, int], str]] = {
    "canary": lambda r, n: "canary-" + _pick(r, string.ascii_lowercase + string.digits, 12),
    "uuid": lambda r, n: str(uuid.UUID(int=r.getrandbits(128), version=4)),
    "sha1": lambda r, n: r.randbytes(20).hex(),
    "sha256": lambda r, n: r.randbytes(32).hex(),
    "integrity": lambda r, n: "sha512-" + base64.b64encode(r.randbytes(64)).decode(),
    "random_b64": lambda r, n: base64.b64encode(r.randbytes(n or 1024)).decode()[: n or None],
    "random_hex": lambda r, n: r.randbytes((n or 64) // 2 + 1).hex()[: n or 64],
    "png_b64": lambda r, n: _png_b64(r, n or 4096),
    "lorem": lambda r, n: _lorem(r, n or 2000),
    "session_id": lambda r, n: r.randbytes(16).hex(),
}


def _json_unicode(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


def _rot13(text: str) -> str:
    return text.translate(str.maketrans(string.ascii_letters,
                                        string.ascii_lowercase[13:] + string.ascii_lowercase[:13]
                                        + string.ascii_uppercase[13:] + string.ascii_uppercase[:13]))


TRANSFORMS: dict[str, Callable[[str], str]] = {
    "b64": lambda s: base64.b64encode(s.encode()).decode(),
    "b64nopad": lambda s: base64.b64encode(s.encode()).decode().rstrip("="),
    "urlsafe_b64": lambda s: base64.urlsafe_b64encode(s.encode()).decode().rstrip("="),
    "hex": lambda s: s.encode().hex(),
    "hexupper": lambda s: s.encode().hex().upper(),
    "lower": str.lower,  # lossless only for upper-case secrets (AWS key ids): use it for those
    "json_unicode": _json_unicode,                                   # every character as \\uXXXX
    "json_unicode1": lambda s: _json_unicode(s[:1]) + s[1:],         # only the first one
    "js_hex": lambda s: "".join(f"\\x{ord(c):02x}" for c in s),
    "percent": lambda s: "".join(f"%{b:02X}" for b in s.encode()),
    "double_percent": lambda s: "".join(f"%25{b:02X}" for b in s.encode()),
    "html_entities": lambda s: "".join(f"&#{ord(c)};" for c in s),
    # Beyond what a scanner can fairly be asked to undo (module docstring): layer "none".
    "reverse": lambda s: s[::-1],
    "rot13": _rot13,
    "b32": lambda s: base64.b32encode(s.encode()).decode().rstrip("=").lower(),
    "gzip_b64": lambda s: base64.b64encode(gzip.compress(s.encode(), mtime=0)).decode(),
    "dashed": lambda s: "-".join(s[i:i + 4] for i in range(0, len(s), 4)),
}
# Cut a form in two: one piece of evidence, leaked only when both halves arrive.
PARTS = {"half1": (0, 2), "half2": (1, 2)}
# Transforms whose output is JSON string syntax: inserted into a JSON body as is, not escaped again.
JSON_SYNTAX = {"json_unicode", "json_unicode1"}


def _part(text: str, index: int, count: int) -> str:
    cut = -(-len(text) // count)
    return text[index * cut:(index + 1) * cut]


@dataclass
class Evidence:
    """One form of one secret; it got out when every piece reached the upstream."""

    secret: str
    form: str  # e.g. "aws_key|b64"; what reports name, never the value
    pieces: dict[int, str] = field(default_factory=dict)  # part index -> text; one piece unless cut
    count: int = 1

    def complete(self) -> tuple[str, ...]:
        return tuple(self.pieces[i] for i in sorted(self.pieces))


class TemplateError(ValueError):
    pass


@dataclass
class Renderer:
    """Renders one case: each secret and filler name gets one random value, shared by all its uses."""

    rng: random.Random = field(default_factory=lambda: random.Random())
    values: dict[str, str] = field(default_factory=dict)
    evidence: dict[str, Evidence] = field(default_factory=dict)

    def value(self, name: str, size: int = 0) -> str:
        key = f"{name}:{size}" if name in FILLERS else name
        if key not in self.values:
            if name in SECRETS:
                self.values[key] = SECRETS[name](self.rng)
                self.evidence.setdefault(name, Evidence(name, name, {0: self.values[key]}))
            elif name in FILLERS:
                self.values[key] = FILLERS[name](self.rng, size)
            else:
                raise TemplateError(f"unknown template name {name!r}")
        return self.values[key]

    def render(self, text: str, *, json_string: bool = False) -> str:
        """text with every placeholder filled. json_string: the result goes inside a JSON string,
        so values are escaped for it (JSON_SYNTAX transforms already are JSON)."""
        def fill(match: re.Match[str]) -> str:
            name, size, chain = match.group(1), int(match.group(2) or 0), match.group(3)
            transforms = [t for t in chain.split("|") if t]
            result = self.value(name, size)
            part = None
            for transform in transforms:
                if transform in PARTS:
                    part = PARTS[transform]
                    result = _part(result, *part)
                elif transform in TRANSFORMS:
                    result = TRANSFORMS[transform](result)
                else:
                    raise TemplateError(f"unknown transform {transform!r} in {match.group(0)}")
            if name in SECRETS and transforms:
                self._record(name, transforms, part, result)
            if json_string and not (transforms and transforms[-1] in JSON_SYNTAX):
                result = json.dumps(result)[1:-1]
            return result

        return PLACEHOLDER.sub(fill, text)

    def render_tree(self, node, *, json_strings: bool = False):
        """Every string (keys too) of a YAML tree rendered; json_strings as in render()."""
        if isinstance(node, str):
            return self.render(node, json_string=json_strings)
        if isinstance(node, list):
            return [self.render_tree(item, json_strings=json_strings) for item in node]
        if isinstance(node, dict):
            return {self.render(str(k), json_string=json_strings): self.render_tree(v, json_strings=json_strings)
                    for k, v in node.items()}
        return node

    def _record(self, name: str, transforms: list[str], part, text: str) -> None:
        form = "|".join([name] + [t if t not in PARTS else "half*" for t in transforms])
        evidence = self.evidence.setdefault(form, Evidence(name, form, count=part[1] if part else 1))
        evidence.pieces[part[0] if part else 0] = text

    def evidence_list(self) -> list[Evidence]:
        """Forms whose pieces were all rendered (a lone half1 is not evidence of the whole)."""
        return [e for e in self.evidence.values() if len(e.pieces) == e.count]

