"""git-gate: the guest's only git remote. A bare repo per upstream, a push policy, forwarding with a bundle-side identity.

    python -m bottle_tasks.sidecars.gitgate --config /etc/bottle/git-gate.yaml          # the daemon
    python -m bottle_tasks.sidecars.gitgate pre-receive  --repo <name>     # run by the hooks (config: $GIT_GATE_CONFIG)
    python -m bottle_tasks.sidecars.gitgate post-receive --repo <name>

Implements "git-gate" in docs/bundle-contract.md. The guest fetches and pushes over git smart HTTP
(``smart_http``); a repo's ``pre-receive`` hook applies the push policy (``policy``, ``hooks``) and
scans every place of the push for secrets (``scan``: headers, messages, added lines, new names, tags), then, for a repo with ``push.approve``, holds the push in the supervise
queue until a human decides (``approval``); ``post-receive`` queues accepted updates, which the forwarder pushes to
the upstream with the repo's identity, retrying with backoff (``forwarder``). Every push decision and
forward attempt is one JSON line in ``audit_log`` and on stdout (``audit``). ``daemon`` keeps the
repos and wires it all; ``config`` reads git-gate.yaml. Each gate has its own repos (refs, config,
hooks), spools, audit log and git files; the gates of an agent's bottles share only the objects
fetched from the upstream and a lock (``shared``).

Stdlib + PyYAML only: this runs inside the bundle image (needs the ``git`` and ``openssh-client`` packages).
"""
