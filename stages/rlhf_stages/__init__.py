"""Stage entry points run inside the RLHF pipeline Jobs."""
