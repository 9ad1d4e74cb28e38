"""bench package (see ../shared/design.md §2)."""
