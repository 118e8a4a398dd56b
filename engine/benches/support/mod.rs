//! What the benches share with each other and with the examples.

#![allow(dead_code)] // each bench and example uses part of it

pub mod invariant_trip;
pub mod trace_replay;
