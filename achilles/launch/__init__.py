"""``achilles up`` / ``down`` / ``logs``: nodes on other machines over SSH, and node services."""
