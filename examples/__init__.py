"""Runnable examples around edge-proxy: a reference legacy backend and the one-command demo."""
