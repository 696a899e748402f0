//! The `capsule` binary (placeholder).
fn main() {}
