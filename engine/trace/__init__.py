"""Expert activation matrices: record, persist, match, predict."""
