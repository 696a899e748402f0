//! capsule-session (placeholder: filled in by its issue).
