"""Test support: a fake of the host layer and the real server in-process (no VMs)."""
