"""Daemons that run inside the sidecar bundle. Only the standard library, mitmproxy and PyYAML."""
