"""git-gate's secret scan, place by place: a hostile agent hides a fake key in every place a push can
carry text to the upstream (scan.py's docstring lists them), and each must refuse the push, naming
the place and never the key; a clean twin of each passes, so the check is not "refuse everything".

The commits are made with git's plumbing in a real repository and reached by no ref: what
pre-receive sees of a push. Every key is random, made here (fake_aws_key and friends).
"""

from __future__ import annotations

import base64
import os
import random
import string
import subprocess
import time
from pathlib import Path

import pytest

from bottle_tasks.contract import PushPolicy
from bottle_tasks.sidecars import dlp, pipelock_scan
from bottle_tasks.sidecars.gitgate import scan
from bottle_tasks.sidecars.gitgate.policy import RefUpdate, evaluate_push
from bottle_tasks.sidecars.gitgate.scan import Place, PlaceText, PushScan, ScanBudget, SecretScanner
from tests.unit.fakes import FakePipelock
from tests.unit.test_gitgate import fake_aws_key, plain_repo  # noqa: F401  (plain_repo: a fixture)

ZERO = "0" * 40
POLICY = PushPolicy(branches=("bottle/*",), tags=True)
REF = "refs/heads/bottle/x"
AUTHOR = "Dev <dev@example.invalid> 1700000000 +0000"


def fake_github_token() -> str:
    return "ghp_" + "".join(random.choices(string.ascii_letters + string.digits, k=36))


class RecordingScanner(SecretScanner):
    """The real floor, and every text it was given."""

    def __init__(self, pipelock=None):
        super().__init__(pipelock)
        self.texts: list[str] = []

    def scan(self, text: str) -> list[str]:
        self.texts.append(text)
        return super().scan(text)


@pytest.fixture()
def repo(plain_repo) -> Path:
    """test_gitgate's repo (a base commit on main, as the mirror has it) with one more file upstream."""
    (plain_repo / "old-name.txt").write_text("a file that already is upstream\n")
    git(plain_repo, "add", "old-name.txt")
    git(plain_repo, "commit", "--quiet", "-m", "upstream")
    return plain_repo


def git(repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=repo, input=input, capture_output=True, env=env)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD")


def blob(repo: Path, data: bytes) -> str:
    return git(repo, "hash-object", "-w", "--stdin", input=data)


KINDS = {"100644": "blob", "100755": "blob", "120000": "blob", "040000": "tree", "160000": "commit"}


def tree(repo: Path, *entries: tuple[str, str, bytes | str], base: str | None = "HEAD") -> str:
    """A tree: base's (the mirror's main) with entries (mode, object id, path: any bytes) put in.
    Through a scratch index; an entry that is a tree (mode 040000) goes in at the top with mktree."""
    index = repo.parent / f"index-{random.randrange(1 << 32)}"
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    git(repo, "read-tree", *([base] if base else ["--empty"]), env=env)
    files = [(mode, oid, name.encode() if isinstance(name, str) else name) for mode, oid, name in entries]
    records = b"".join(f"{mode} {KINDS[mode]} {oid}\t".encode() + name + b"\0" for mode, oid, name in files
                       if mode != "040000")
    git(repo, "update-index", "-z", "--index-info", input=records, env=env)
    top = git(repo, "write-tree", "--missing-ok", env=env)
    index.unlink()
    trees = [f"{mode} tree {oid}\t".encode() + name + b"\0" for mode, oid, name in files if mode == "040000"]
    if not trees:
        return top
    listing = subprocess.run(["git", "ls-tree", "-z", top], cwd=repo, capture_output=True, check=True).stdout
    return git(repo, "mktree", "-z", "--missing", input=listing + b"".join(trees))


def commit(repo: Path, tree_id: str, message: bytes | str = "work\n", *, parents: tuple[str, ...] | None = None,
           author: str = AUTHOR, committer: str = AUTHOR, headers: bytes | str = b"") -> str:
    """A commit object written as is (odd headers included): reached by no ref."""
    parents = (head(repo),) if parents is None else parents
    raw = f"tree {tree_id}\n" + "".join(f"parent {p}\n" for p in parents) + f"author {author}\ncommitter {committer}\n"
    extra = headers.encode() if isinstance(headers, str) else headers
    body = message.encode() if isinstance(message, str) else message
    return git(repo, "hash-object", "-t", "commit", "-w", "--literally", "--stdin", input=raw.encode() + extra + b"\n" + body)


def tag_object(repo: Path, target: str, kind: str = "commit", *, name: str = "v1", tagger: str = AUTHOR,
               message: str = "release\n") -> str:
    raw = f"object {target}\ntype {kind}\ntag {name}\ntagger {tagger}\n\n{message}".encode()
    return git(repo, "hash-object", "-t", "tag", "-w", "--literally", "--stdin", input=raw)


def file_commit(repo: Path, files: dict[bytes | str, bytes | str], message: str = "work\n", **kwargs) -> str:
    entries = [("100644", blob(repo, content.encode() if isinstance(content, str) else content), name)
               for name, content in files.items()]
    return commit(repo, tree(repo, *entries), message, **kwargs)


def reasons(repo: Path, new: str, ref: str = REF, scanner: SecretScanner | None = None, **kwargs) -> tuple[str, ...]:
    [decision] = evaluate_push(POLICY, [RefUpdate(ZERO, new, ref)], repo, scanner or SecretScanner(), **kwargs)
    return decision.reasons


def refused(repo: Path, new: str, key: str, **kwargs) -> tuple[str, ...]:
    """The reasons of a push that must be refused; none of them shows the key."""
    why = reasons(repo, new, **kwargs)
    assert why, "the push was accepted"
    assert not any(key in reason or key[4:] in reason for reason in why), why
    return why


def short(oid: str) -> str:
    return oid[:scan.SHORT_ID]


# ---------------------------------------------------------------------------------------------
# author and committer


@pytest.mark.parametrize("who", ["author name", "author email", "committer name", "committer email"])
def test_a_key_in_an_author_or_committer_is_refused(repo, who):
    key = fake_aws_key()
    person = f"Dev {key} <dev@example.invalid> 1700000000 +0000" if who.endswith("name") \
        else f"Dev <{key}@example.invalid> 1700000000 +0000"
    role = who.split()[0]
    new = file_commit(repo, {"a.txt": "clean\n"}, **{role: person})
    assert refused(repo, new, key) == (f"secret in the {role} of commit {short(new)}: aws_access_key_id",)


def test_ordinary_authors_and_committers_pass(repo):
    new = file_commit(repo, {"a.txt": "clean\n"}, author="Ada Lovelace <ada@example.invalid> 1700000000 +0100",
                      committer="CI Bot <ci-bot+AKIA@example.invalid> 1700000001 -0500")
    assert reasons(repo, new) == ()


# ---------------------------------------------------------------------------------------------
# extra headers: what git keeps and most tools never show


def test_a_key_in_a_gpgsig_header_is_refused_even_cut_across_its_lines(repo):
    key = fake_aws_key()
    whole = commit(repo, tree(repo), headers=f"gpgsig -----BEGIN PGP SIGNATURE-----\n {key}\n -----END PGP SIGNATURE-----\n")
    assert refused(repo, whole, key) == (f"secret in the gpgsig header of commit {short(whole)}: aws_access_key_id",)
    cut = commit(repo, tree(repo), headers=f"gpgsig -----BEGIN PGP SIGNATURE-----\n {key[:9]}\n {key[9:]}\n"
                                           " -----END PGP SIGNATURE-----\n")
    assert refused(repo, cut, key) == (
        f"secret in the gpgsig header of commit {short(cut)}, joined across line breaks: aws_access_key_id",)


def test_a_key_in_a_mergetag_header_is_refused(repo):
    token = fake_github_token()
    embedded = f"object {head(repo)}\n type commit\n tag side\n tagger Dev {token} <d@example.invalid> 1 +0000\n \n merged\n"
    new = commit(repo, tree(repo), headers=f"mergetag {embedded}")
    assert refused(repo, new, token) == (f"secret in the mergetag header of commit {short(new)}: github_token",)


def test_a_key_in_an_unknown_header_is_refused_without_naming_the_header(repo):
    key = fake_aws_key()
    in_value = commit(repo, tree(repo), headers=f"x-build-meta token={key}\n")
    assert refused(repo, in_value, key) == (f"secret in an unknown header of commit {short(in_value)}: aws_access_key_id",)
    in_name = commit(repo, tree(repo), headers=f"{key} 1\n")  # the header's name is the agent's text too
    assert refused(repo, in_name, key) == (f"secret in an unknown header of commit {short(in_name)}: aws_access_key_id",)


def test_a_key_in_an_encoding_header_is_refused(repo):
    key = fake_aws_key()
    new = commit(repo, tree(repo), headers=f"encoding {key}\n")
    assert refused(repo, new, key) == (f"secret in the encoding header of commit {short(new)}: aws_access_key_id",)


def test_clean_extra_headers_pass(repo):
    signature = "".join(random.choices(string.ascii_letters + string.digits + "+/", k=64 * 6))
    lines = "\n ".join(signature[i:i + 64] for i in range(0, len(signature), 64))
    new = commit(repo, tree(repo), headers=f"encoding ISO-8859-1\ngpgsig -----BEGIN PGP SIGNATURE-----\n \n {lines}\n"
                                           f" -----END PGP SIGNATURE-----\nx-build-meta id=42\n",
                 message="caf\xe9\n".encode("latin-1"))
    assert reasons(repo, new) == ()


# ---------------------------------------------------------------------------------------------
# the message, as stored and as its encoding header makes git show it


def test_a_key_in_a_message_that_git_log_decodes_into_nonsense_is_refused(repo):
    """`git log` shows this message decoded as UTF-16: nonsense; the raw object holds the key."""
    key = fake_aws_key()
    new = commit(repo, tree(repo), f"{key}\n\n", headers="encoding UTF-16\n")  # even: iconv takes it
    assert "AKIA" not in git(repo, "log", "-1", "--format=%B", new)
    assert refused(repo, new, key) == (f"secret in the message of commit {short(new)}: aws_access_key_id",)


def test_a_key_stored_in_utf7_is_refused_as_git_decodes_it(repo):
    """Raw, the message is "+AEEASwBJ...-"; git log (and a forge that honours the header) shows the key."""
    key = fake_aws_key()
    utf7 = "+" + base64.b64encode(key.encode("utf-16-be")).decode().rstrip("=") + "-"
    person = "Dev <dev@example.invalid> 1700000000 -0100"  # no "+": the whole object must read as UTF-7
    new = commit(repo, tree(repo), f"See {utf7} now\n", headers="encoding UTF-7\n", author=person, committer=person)
    assert key in git(repo, "log", "-1", "--format=%B", new)
    (reason,) = refused(repo, new, key)  # the floor may read the UTF-7 itself, before git's decoding does
    assert reason.startswith(f"secret in the message of commit {short(new)}") and reason.endswith("aws_access_key_id")
    clean = commit(repo, tree(repo), "See +AGMAYQBmAOk- now\n", headers="encoding UTF-7\n", author=person,
                   committer=person)
    assert git(repo, "log", "-1", "--format=%B", clean) == "See caf\xe9 now"
    assert reasons(repo, clean) == ()


def test_a_key_cut_across_the_lines_of_a_message_is_refused(repo):
    key = fake_aws_key()
    new = file_commit(repo, {"a.txt": "clean\n"}, f"Fix the build\n\nSee {key[:11]}\n{key[11:]}\n")
    assert refused(repo, new, key) == (
        f"secret in the message of commit {short(new)}, joined across line breaks: aws_access_key_id",)


# ---------------------------------------------------------------------------------------------
# file names: new ones, rename targets, odd bytes, directories


def test_a_key_as_a_new_empty_files_name_is_refused(repo):
    key = fake_aws_key()
    new = file_commit(repo, {f"notes/{key}.txt": ""})  # an empty blob: no added line at all
    assert refused(repo, new, key) == (f"secret in the file names of commit {short(new)}: aws_access_key_id",)


def test_a_rename_onto_a_key_is_refused_though_it_adds_no_line(repo):
    key = fake_aws_key()
    unchanged = git(repo, "rev-parse", "HEAD:old-name.txt")
    listing = [line for line in git(repo, "ls-tree", "HEAD").splitlines() if not line.endswith("\told-name.txt")]
    moved = git(repo, "mktree", input=("\n".join(listing) + f"\n100644 blob {unchanged}\t{key}\n").encode())
    new = commit(repo, moved)
    assert git(repo, "diff", "--find-renames", "--numstat", "HEAD", new).split()[:2] == ["0", "0"]
    assert refused(repo, new, key) == (f"secret in the file names of commit {short(new)}: aws_access_key_id",)


def test_renaming_a_clean_file_passes(repo):
    unchanged = git(repo, "rev-parse", "HEAD:old-name.txt")
    listing = [line for line in git(repo, "ls-tree", "HEAD").splitlines() if not line.endswith("\told-name.txt")]
    moved = git(repo, "mktree", input=("\n".join(listing) + f"\n100644 blob {unchanged}\tnew-name.txt\n").encode())
    assert reasons(repo, commit(repo, moved)) == ()


def test_a_key_in_a_name_with_odd_bytes_is_refused(repo):
    """core.quotePath would print this name as "\\377\\n..." in quotes; -z gives the bytes."""
    key = fake_aws_key()
    new = file_commit(repo, {b"\xff\x01odd\n" + key.encode() + b"\xe9": "x\n"})
    assert refused(repo, new, key) == (f"secret in the file names of commit {short(new)}: aws_access_key_id",)
    clean = file_commit(repo, {b"\xff\x01odd\ncaf\xc3\xa9 \xe9": "x\n"})
    assert reasons(repo, clean) == ()


def test_a_key_naming_a_directory_that_holds_only_an_empty_tree_is_refused(repo):
    """No file is under it, so no diff shows it; comparing trees (-t) does."""
    key = fake_aws_key()
    empty = git(repo, "hash-object", "-t", "tree", "-w", "--stdin", input=b"")
    new = commit(repo, tree(repo, ("040000", empty, key)))
    assert refused(repo, new, key) == (f"secret in the file names of commit {short(new)}: aws_access_key_id",)


def test_a_key_cut_into_directories_is_refused(repo):
    key = fake_aws_key()
    new = file_commit(repo, {f"src/{key[:8]}/{key[8:]}/main.c": "int main;\n"})
    assert refused(repo, new, key) == (
        f"secret in the file names of commit {short(new)}, joined across '/': aws_access_key_id",)


def test_deleting_a_file_named_like_a_key_that_is_upstream_already_passes(repo):
    key = fake_aws_key()
    (repo / key).write_text("leaked earlier\n")
    git(repo, "add", key)
    git(repo, "commit", "--quiet", "-m", "already upstream")  # on main: the mirror has it
    listing = [line for line in git(repo, "ls-tree", "HEAD").splitlines() if not line.endswith("\t" + key)]
    assert reasons(repo, commit(repo, git(repo, "mktree", input=("\n".join(listing) + "\n").encode()))) == ()


def test_a_merge_that_brings_a_key_named_file_from_neither_parent_is_refused(repo):
    key = fake_aws_key()
    side = file_commit(repo, {"side.txt": "side\n"})
    entries = [("100644", blob(repo, b"side\n"), "side.txt"), ("100644", blob(repo, b""), key)]
    merge = commit(repo, tree(repo, *entries), "merge side\n", parents=(head(repo), side))
    assert refused(repo, merge, key) == (f"secret in the file names of commit {short(merge)}: aws_access_key_id",)
    clean = commit(repo, tree(repo, entries[0]), "merge side\n", parents=(head(repo), side))
    assert reasons(repo, clean) == ()


# ---------------------------------------------------------------------------------------------
# values cut across lines


@pytest.mark.parametrize("shape", ["halves", "string concatenation", "continued line", "one char a line", "list"])
def test_a_key_cut_across_added_lines_is_refused(repo, shape):
    key = fake_aws_key()
    text = {
        "halves": f"{key[:10]}\n{key[10:]}\n",
        "string concatenation": f'const id = "{key[:7]}" +\n    "{key[7:]}";\n',
        "continued line": f'KEY={key[:12]}\\\n{key[12:]}\n',
        "one char a line": "".join(f"  {ch}\n" for ch in key),
        "list": f'parts = [\n  "{key[:5]}",\n  "{key[5:13]}",\n  "{key[13:]}",\n]\n',
    }[shape]
    new = file_commit(repo, {"config.js": f"// settings\n{text}// end\n"})
    assert refused(repo, new, key) == (
        f"secret in the added lines of commit {short(new)}, joined across line breaks: aws_access_key_id",)


def test_a_key_cut_across_lines_of_a_changed_file_is_refused(repo):
    key = fake_aws_key()
    new = file_commit(repo, {"old-name.txt": f"a file that already is upstream\n{key[:6]}\n{key[6:]}\n"})
    assert refused(repo, new, key) == (
        f"secret in the added lines of commit {short(new)}, joined across line breaks: aws_access_key_id",)


def test_ordinary_code_word_lists_and_wrapped_hex_pass_when_joined(repo):
    wrapped = random.randbytes(6000).hex()
    source = "\n".join([
        "def handler(event):", '    region = "us-east-1"', '    return {"ok": True,', '            "id": event["id"]}',
        "EUROPE", "AFRICA", "AMERICAS", "OCEANIA", "ASIA",  # ASIA first would read as an upper-case key id
        *(wrapped[i:i + 76] for i in range(0, len(wrapped), 76)),
    ]) + "\n"
    new = file_commit(repo, {"handler.py": source}, "Add the handler\n\nIt answers\nevery event.\n")
    assert reasons(repo, new) == ()


# ---------------------------------------------------------------------------------------------
# symlinks and submodules


def test_a_key_as_a_symlink_target_is_refused(repo):
    key = fake_aws_key()
    new = commit(repo, tree(repo, ("120000", blob(repo, f"../{key}".encode()), "link")))
    assert refused(repo, new, key) == (f"secret in the added lines of commit {short(new)}: aws_access_key_id",)
    assert reasons(repo, commit(repo, tree(repo, ("120000", blob(repo, b"../base.txt"), "link")))) == ()


def test_a_token_in_a_submodule_url_is_refused_and_the_gitlink_reaches_the_floor(repo):
    token = fake_github_token()
    gitlink = random.randbytes(20).hex()
    modules = f'[submodule "lib"]\n\tpath = lib\n\turl = https://x-access-token:{token}@github.com/o/lib.git\n'
    new = commit(repo, tree(repo, ("100644", blob(repo, modules.encode()), ".gitmodules"),
                            ("160000", gitlink, "lib")))
    assert refused(repo, new, token) == (f"secret in the added lines of commit {short(new)}: github_token",)
    clean = commit(repo, tree(repo, ("100644", blob(repo, modules.replace(f"x-access-token:{token}@", "").encode()),
                                     ".gitmodules"), ("160000", gitlink, "lib")))
    scanner = RecordingScanner()
    assert reasons(repo, clean, scanner=scanner) == ()
    # A gitlink's id is any 40 hex digits the agent likes: whatever the floor makes of it, it sees it.
    assert any(f"Subproject commit {gitlink}" in text for text in scanner.texts)


def test_a_gitlink_holding_a_hex_encoded_key_gets_the_floors_verdict(repo):
    key = fake_aws_key()
    gitlink = key.encode().hex()  # 20 characters: exactly one object id
    new = commit(repo, tree(repo, ("160000", gitlink, "vendor")))
    floor = dlp.matching_pattern_names(f"+Subproject commit {gitlink}\n")
    expected = (f"secret in the added lines of commit {short(new)}: {', '.join(floor)}",) if floor else ()
    assert reasons(repo, new) == expected


# ---------------------------------------------------------------------------------------------
# annotated tags


def test_a_key_in_a_tagger_or_tag_message_is_refused_even_in_an_inner_tag(repo):
    key, other = fake_aws_key(), fake_github_token()
    target = file_commit(repo, {"a.txt": "clean\n"})
    inner = tag_object(repo, target, name="inner", tagger=f"Rel {key} <r@example.invalid> 1 +0000")
    outer = tag_object(repo, inner, "tag", name="v1", message=f"notes\n{other}\n")
    why = refused(repo, outer, key, ref="refs/tags/v1")
    assert set(why) == {f"secret in the tagger of tag {short(inner)}: aws_access_key_id",
                        f"secret in the message of tag {short(outer)}: github_token"}
    assert other not in " ".join(why)
    assert reasons(repo, tag_object(repo, target, name="v2"), ref="refs/tags/v2") == ()


def test_a_key_in_a_tag_name_header_is_refused(repo):
    key = fake_aws_key()
    new = tag_object(repo, file_commit(repo, {"a.txt": "x\n"}), name=f"v1-{key}")
    assert refused(repo, new, key, ref="refs/tags/v1") == (f"secret in the tag header of tag {short(new)}: aws_access_key_id",)


def test_a_key_in_a_ref_name_is_refused(repo):
    key = fake_aws_key()
    new = file_commit(repo, {"a.txt": "x\n"})
    assert refused(repo, new, key, ref=f"refs/heads/bottle/{key}") == ("the ref name looks like a secret",)


# ---------------------------------------------------------------------------------------------
# batching: few scanner calls per push, and each finding still has its place


def _chain(repo: Path, count: int, secret_at: int | None = None, key: str = "") -> list[str]:
    """count commits, one after the other, each adding a line to its own file (fast-import: quick)."""
    script = []
    for i in range(count):
        content = f"{key}\n" if i == secret_at else f"line {i}\n"
        message = f"commit {i}"
        script.append(f"commit refs/scratch\nmark :{i + 1}\ncommitter Dev <dev@example.invalid> {1700000000 + i} +0000\n"
                      f"data {len(message)}\n{message}\n" + (f"from {head(repo)}\n" if i == 0 else "")
                      + f"M 644 inline f{i}.txt\ndata {len(content)}\n{content}\n")
    marks = repo / "marks"
    subprocess.run(["git", "fast-import", "--quiet", f"--export-marks={marks}"], cwd=repo,
                   input="".join(script).encode(), check=True)
    git(repo, "update-ref", "-d", "refs/scratch")
    by_mark = dict(line.split() for line in marks.read_text().splitlines())
    return [by_mark[f":{i + 1}"] for i in range(count)]


def test_a_push_of_many_commits_is_scanned_in_a_few_calls_and_the_finding_keeps_its_commit(repo):
    key = fake_aws_key()
    clean = _chain(repo, 400)
    scanner = RecordingScanner()
    assert reasons(repo, clean[-1], scanner=scanner) == ()
    assert len(scanner.texts) == 1  # 400 commits, about 2,400 places: one window
    assert all(f"line {i}\n" in scanner.texts[0] for i in range(400))
    leaky = _chain(repo, 400, secret_at=237, key=key)
    scanner = RecordingScanner()
    assert refused(repo, leaky[-1], key, scanner=scanner) == (
        f"secret in the added lines of commit {short(leaky[237])}: aws_access_key_id",)
    assert len(scanner.texts) <= 1 + 2 * 13  # then halves: two calls a level, log2(2,400) levels


def test_pipelock_sees_the_new_places_in_one_request_per_window(repo):
    """The texts of every place reach pipelock; a clean push of many commits is one window of requests."""
    key = "".join(random.choices(string.ascii_lowercase, k=24))  # nothing the floor knows
    allow = FakePipelock(lambda _: (200, {"status": "completed", "decision": "allow", "findings": []}))
    empty = git(repo, "hash-object", "-t", "tree", "-w", "--stdin", input=b"")
    parent = _chain(repo, 150)[-1]
    new = commit(repo, tree(repo, ("040000", empty, f"dir-{key}")), parents=(parent,),
                 author=f"Dev <{key}@example.invalid> 1 +0000", headers=f"x-meta {key}-header\n")
    try:
        assert reasons(repo, new, scanner=SecretScanner(pipelock_scan.PipelockClient(allow.url, "t"))) == ()
    finally:
        allow.close()
    # One window of places; the client cuts it into its own chunks (pipelock_scan.CHUNK_CHARS) and no more.
    assert len(allow.requests) <= 1 + sum(len(r["input"]["text"]) for r, _ in allow.requests) // pipelock_scan.CHUNK_CHARS
    text = "".join(request["input"]["text"] for request, _ in allow.requests)
    assert f"dir-{key}" in text and f"<{key}@example.invalid>" in text and f"{key}-header" in text


def test_places_written_together_never_join_into_a_key():
    """End of one place + start of the next must not make a key: the separator stops every pattern."""
    key = fake_aws_key()
    push = PushScan(SecretScanner(), ScanBudget())
    for i, text in enumerate((f"ends with {key[:12]}", f"{key[12:]} starts the next", f"aws_secret_access_key",
                              "= " + "A" * 40)):
        place = PlaceText(push, Place(f"place {i}", "commit", "c" * 40))
        place.write(text)
        place.close()
    push.flush()
    assert push.findings == {}


class FlaggingScanner(RecordingScanner):
    """A scanner with a pattern of its own (as pipelock has): the flag; optionally blind to separators."""

    def __init__(self, flag: str, *, reads_past_separators: bool = False):
        super().__init__()
        self.flag, self.reads_past_separators = flag, reads_past_separators

    def scan(self, text: str) -> list[str]:
        self.texts.append(text)
        seen = text.replace(scan.PLACE_SEPARATOR, "") if self.reads_past_separators else text
        return ["pipelock:DLP-Flag"] if self.flag in seen else []


def test_finding_places_costs_a_bounded_number_of_calls_however_many_places_hold_a_secret(repo):
    flag = "flag-" + "".join(random.choices(string.ascii_lowercase, k=16))
    script = "".join(f"commit refs/scratch\ncommitter Dev <dev@example.invalid> {1700000000 + i} +0000\ndata 2\nc\n"
                     + (f"from {head(repo)}\n" if i == 0 else "") + f"M 644 inline f{i}.txt\ndata {len(flag) + 1}\n{flag}\n\n"
                     for i in range(300))
    subprocess.run(["git", "fast-import", "--quiet"], cwd=repo, input=script.encode(), check=True)
    tip = git(repo, "rev-parse", "refs/scratch")
    git(repo, "update-ref", "-d", "refs/scratch")
    scanner = FlaggingScanner(flag)
    why = reasons(repo, tip, scanner=scanner)
    assert len(scanner.texts) <= 1 + scan.MAX_ATTRIBUTION_CALLS
    assert why and all(reason.endswith(": pipelock:DLP-Flag") for reason in why)
    assert any("together with the places after it" in reason for reason in why)  # the calls ran out


def test_a_match_only_places_together_make_is_still_named():
    """A scanner that reads past the separator (pipelock might normalise it away) matches the two
    halves together: the finding is kept, named by the first place."""
    flag = "flag-" + "".join(random.choices(string.ascii_lowercase, k=16))
    push = PushScan(FlaggingScanner(flag, reads_past_separators=True), ScanBudget())
    first, second = Place("the author", "commit", "a" * 40), Place("the committer", "commit", "a" * 40)
    for place, text in ((first, f"Dev {flag[:9]}"), (second, f"{flag[9:]} Ops")):
        writer = PlaceText(push, place)
        writer.write(text)
        writer.close()
    push.flush()
    assert push.findings == {Place("the author", "commit", "a" * 40, "together with the places after it"):
                             ["pipelock:DLP-Flag"]}


def test_a_finding_no_ref_owns_still_refuses_every_ref(repo, monkeypatch):
    """Fail closed: the scan found something the policy cannot pin on a ref (it never should)."""
    from bottle_tasks.sidecars.gitgate import policy
    monkeypatch.setattr(policy, "scan_push", lambda *args, **kwargs: {Place("the message", "commit", "f" * 40): ["x"]})
    new = file_commit(repo, {"a.txt": "clean\n"})
    decisions = evaluate_push(POLICY, [RefUpdate(ZERO, new, REF), RefUpdate(ZERO, new, "refs/heads/bottle/y")], repo,
                              SecretScanner())
    assert [d.reasons for d in decisions] == [("secret in the push: x",)] * 2


def test_a_push_with_two_refs_scans_their_shared_commits_once_and_names_both(repo):
    key = fake_aws_key()
    leaky = file_commit(repo, {"k.txt": f"{key}\n"})
    tip = file_commit(repo, {"k.txt": f"{key}\n", "b.txt": "b\n"}, parents=(leaky,))
    scanner = RecordingScanner()
    decisions = evaluate_push(POLICY, [RefUpdate(ZERO, leaky, "refs/heads/bottle/a"),
                                       RefUpdate(ZERO, tip, "refs/heads/bottle/b")], repo, scanner)
    expected = f"secret in the added lines of commit {short(leaky)}: aws_access_key_id"
    assert [d.reasons for d in decisions] == [(expected,), (expected,)]
    assert sum(text.count(key) for text in scanner.texts[:1]) == 1  # the first call had the key once


# ---------------------------------------------------------------------------------------------
# hostile repositories: the scan stays bounded


def test_a_giant_file_name_with_a_key_at_its_end_is_read_in_pieces(repo):
    key = fake_aws_key()
    name = "n" * (3 * scan.LINE_PIECE_BYTES + 17) + key
    new = file_commit(repo, {name: ""})
    scanner = RecordingScanner()
    assert refused(repo, new, key, scanner=scanner) == (
        f"secret in the file names of commit {short(new)}: aws_access_key_id",)
    assert max(len(text) for text in scanner.texts) <= scan.SCAN_WINDOW_CHARS


def test_many_files_a_binary_blob_and_a_deep_history_are_scanned_quickly_and_pass(repo):
    shared = blob(repo, b"x\n")
    many = commit(repo, tree(repo, *(("100644", shared, f"file-{i:05d}.txt") for i in range(20_000))))
    picture = blob(repo, random.randbytes(2_000_000))
    binary = commit(repo, tree(repo, ("100644", picture, "image.png"), base=many), parents=(many,))
    history = _chain(repo, 3000)
    for new in (binary, history[-1]):
        started = time.monotonic()
        scanner = RecordingScanner()
        assert reasons(repo, new, scanner=scanner) == ()
        assert time.monotonic() - started < 30
        assert len(scanner.texts) <= 8


def test_a_push_over_the_text_budget_is_refused_and_one_over_the_time_is_too(repo):
    new = file_commit(repo, {f"f{i}.txt": f"line {i}\n" * 50 for i in range(40)})
    [over_text] = reasons(repo, new, budget=ScanBudget(limit=4096))
    assert "more than the secret scan reads in one push" in over_text
    [over_time] = reasons(repo, new, budget=ScanBudget(seconds=0.0001))
    assert "took longer than" in over_time or "timed out" in over_time
