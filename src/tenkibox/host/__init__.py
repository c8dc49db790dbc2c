"""One machine's live VMs behind ``HostAPI``: boot, restore, capture, volumes, exec, files."""
