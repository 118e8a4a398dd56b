//! The invariant layer: declared rules, violations, resolutions and the reconciliation loop.
//!
//! - [`spec`]: invariants as data ([`Schema`], loadable from JSON): `range` (with an optional fold
//!   over a ledger), `unique`, `transitions`, `once`, `capacity`; each with a [`Policy`].
//! - [`record`]: the facts written into documents: [`Resolution`]s and [`Conflict`]s keyed by a
//!   deterministic [`ViolationId`]. Compensations are facts, never deltas.
//! - [`reconcile`]: the [`Reconciler`]: observe → compare → act → repeat; custom rules in Rust
//!   through the [`Invariant`] trait.
//!
//! The server is the canonical repairer (it gives commit order); other replicas run the same
//! checks to warn early, and all of them read the same facts, so derived values agree everywhere.

mod claim;
mod collection;
pub mod reconcile;
pub mod record;
mod relate;
pub mod spec;
mod table;

pub use reconcile::{
    choose, folded_total, ChooseError, CustomViolation, Invariant, Outcome, ReconcileStats,
    Reconciler, Violation,
};
pub use record::{
    read_records, read_type, type_op, Action, Conflict, ConflictOption, Records, Resolution,
    ViolationId,
};
pub use spec::{Fold, InvariantSpec, Policy, Rule, Schema, SchemaError, Sign};

#[cfg(test)]
mod tests;
