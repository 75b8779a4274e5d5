"""lmms-eval task yamls of the twins (``TaskManager(include_path=TASKS_DIR)``) and their hooks."""
