"""Stored artifacts (RAM images, device states, disk layers), identified by content digest."""
