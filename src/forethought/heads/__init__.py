"""Draft heads' training (the heads themselves, their file and drafting: forethought.model.heads)."""
