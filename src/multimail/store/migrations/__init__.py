"""store/migrations."""
