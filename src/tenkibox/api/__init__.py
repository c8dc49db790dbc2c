"""The REST API: thin routes per resource over the control plane."""
