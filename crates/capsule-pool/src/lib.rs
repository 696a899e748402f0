//! capsule-pool (placeholder: filled in by its issue).
