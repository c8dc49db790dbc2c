"""The control plane: every record and every state change (the only writer of rows)."""
