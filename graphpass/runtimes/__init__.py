"""Runtime adapters: load and run a model in each runtime graphpass targets, and what each requires of a model."""
