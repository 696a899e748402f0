//! capsule-worker (placeholder: filled in by its issue).
