"""Backends: how the guest is built, started, reached (exec/cp) and fenced. They share the bundle."""
