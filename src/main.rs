//! Thin entry point (work in progress).
fn main() {}
