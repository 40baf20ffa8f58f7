"""Names on a wildcard route (dlp.hostname_problem): a name the agent chose must not carry a
secret or look like encoded data, since the lookup leaves the bundle before any other check;
ordinary names pass."""

from __future__ import annotations

import base64
import secrets

import pytest

from bottle_tasks.sidecars import dlp
from tests.unit.test_dlp import fake_aws_key, fake_secrets

BENIGN = [
    ("*.cloudfront.net", "d111111abcdef8.cloudfront.net"),
    ("*.cloudfront.net", "d2c3e4f5a6b7c8.cloudfront.net"),
    ("*.amazonaws.com", "my-company-production-assets-us-east-1.s3.amazonaws.com"),
    ("*.amazonaws.com", "logs-2024-01-15-backup-prod-1234.s3.us-west-2.amazonaws.com"),
    ("*.amazonaws.com", "dualstack.internal-my-elb-1234567890.us-east-1.elb.amazonaws.com"),
    ("*.amazonaws.com", "ec2-54-123-45-67.compute-1.amazonaws.com"),
    ("*.amazonaws.com", "abc123defg.execute-api.us-east-1.amazonaws.com"),
    ("*.example.com", "us-east-1.example.com"),
    ("*.example.com", "my-api-v2.example.com"),
    ("*.example.com", "pr-1234.example.com"),
    ("*.example.com", "abc123.example.com"),
    ("*.example.com", "api.v2.staging.example.com"),
    ("*.example.com", "ip-10-0-0-1.eu-central-1.example.com"),
    ("*.example.com", "xn--bcher-kva.example.com"),
    ("*.example.com", "k8s-prod-eks-cluster.example.com"),
    ("*.example.com", "internationalization.example.com"),
    ("*.example.com", "rhythm-and-blues.example.com"),
    ("*.vercel.app", "my-app-git-feature-login-team.vercel.app"),
    ("*.vercel.app", "my-app-4f3k2j1h0-team.vercel.app"),
    ("*.netlify.app", "deploy-preview-123--my-site.netlify.app"),
    ("*.herokuapp.com", "app-name-1a2b3c4d5e6f.herokuapp.com"),
    ("*.github.dev", "user-repo-abc123xyz-8080.app.github.dev"),
    ("*.npmmirror.com", "registry.npmmirror.com"),
    ("*.npmmirror.com", "cdn.npmmirror.com"),
    ("*.githubusercontent.com", "objects-origin.githubusercontent.com"),
    ("*.pythonhosted.org", "files.pythonhosted.org"),
    ("*.docker.io", "registry-1.docker.io"),
]


@pytest.mark.parametrize("route, host", BENIGN)
def test_ordinary_names_pass(route, host):
    assert dlp.hostname_problem(host, route) is None


def b32(data: bytes) -> str:
    return base64.b32encode(data).decode().lower().rstrip("=")


def names_with_a_key() -> dict[str, str]:
    key = fake_aws_key()
    hex_key = key.encode().hex()
    return {
        "a key": key.lower(),
        "a key across labels": f"{key[:7]}.{key[7:14]}.{key[14:]}".lower(),
        "a key in base32": b32(key.encode()),
        "a key in base32 across labels": ".".join(b32(key.encode())[i:i + 10] for i in range(0, 32, 10)),
        "a key in hex across labels": ".".join(hex_key[i:i + 14] for i in range(0, len(hex_key), 14)),
        "a key in base64, case kept": base64.urlsafe_b64encode(key.encode()).decode().rstrip("=").replace("_", "-"),
        "a github token": fake_secrets()["github_token"].lower(),  # a lower-cased token is useless, the name is not
    }


@pytest.mark.parametrize("label", sorted(names_with_a_key()))
def test_a_name_that_carries_a_key_is_refused(label):
    name = names_with_a_key()[label]
    assert dlp.hostname_problem(f"{name}.example.com", "*.example.com") == "hostname_secret", name


RANDOM_SHAPES = {  # name: (a random name of that shape, the share that must be refused)
    "32 hex characters": (lambda: secrets.token_hex(16), 1.0),
    "20 hex characters in dashes": (lambda: "-".join(secrets.token_hex(5) for _ in range(4)), 1.0),
    "20 base36 characters": (lambda: "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(20)), 0.99),
    "20 base32 characters": (lambda: b32(secrets.token_bytes(13))[:20], 0.98),
    "base32 in four labels of 8": (lambda: ".".join(b32(secrets.token_bytes(5)) for _ in range(4)), 0.98),
    "20 base64 characters, case kept": (lambda: base64.urlsafe_b64encode(secrets.token_bytes(15)).decode().replace("_", "-"), 0.9),
    "14 random consonants": (lambda: "".join(secrets.choice("bcdfghjklmnpqrstvwxz") for _ in range(14)), 1.0),
    "too many labels": (lambda: ".".join(secrets.choice("abc") for _ in range(6)), 1.0),
    "too long": (lambda: "word-" * 25 + "x", 1.0),
}


@pytest.mark.parametrize("shape", sorted(RANDOM_SHAPES))
def test_random_data_is_refused(shape):
    make, share = RANDOM_SHAPES[shape]
    refused = sum(dlp.hostname_problem(f"{make()}.example.com", "*.example.com") == "hostname_encoded" for _ in range(400))
    assert refused >= share * 400


def test_a_secret_is_named_as_such():
    key = fake_aws_key()
    for name in (key.lower(), b32(key.encode()), f"{key[:10]}.{key[10:]}".lower()):
        assert dlp.hostname_problem(f"{name}.example.com", "*.example.com") == "hostname_secret"


def test_only_the_labels_the_agent_chose_count():
    key = fake_aws_key().lower()
    assert dlp.hostname_problem(f"{key}.example.com", "exact.example.com") is None  # not a wildcard route
    assert dlp.hostname_problem(f"api.{key}.com", "*.example.com") is None  # not this route's host
    assert dlp.hostname_problem(f"api.{key}.example.com", f"*.{key}.example.com") is None  # the route's own labels
    assert dlp.hostname_problem(f"{key.upper()}.Example.COM.", "*.example.com") == "hostname_secret"  # DNS case, root dot
    assert dlp.hostname_problem("MyApp-Staging.example.com", "*.example.com") is None  # capitals on words


def test_one_uuid_label_is_a_tenant_name_and_no_more():
    import uuid
    tenant = str(uuid.uuid4())
    assert dlp.hostname_problem(f"{tenant}.example.com", "*.example.com") is None
    assert dlp.hostname_problem(f"api.{tenant}.example.com", "*.example.com") is None
    # The exemption is one canonical UUID: a second one, data beside it, or a case that carries bits is judged as data.
    assert dlp.hostname_problem(f"{tenant}.{uuid.uuid4()}.example.com", "*.example.com") == "hostname_encoded"
    assert dlp.hostname_problem(f"{secrets.token_hex(12)}.{tenant}.example.com", "*.example.com") == "hostname_encoded"
    mixed = "".join(c.upper() if i % 3 == 0 else c for i, c in enumerate(tenant))
    assert dlp.hostname_problem(f"{mixed}.example.com", "*.example.com") == "hostname_encoded"
    assert dlp.hostname_problem(f"{tenant.replace('-', '')}.example.com", "*.example.com") == "hostname_encoded"
