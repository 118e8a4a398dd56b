//! Counters and gauges, rendered in the Prometheus text format by hand.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use accord_engine::protocol::ErrorCode;

/// Upper bounds of the commit latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Error codes tracked by number (0 collects unknown codes).
const CODES: usize = 16;

/// The server's metrics. Every field is an atomic: no lock is shared by documents.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: AtomicI64,
    /// Document actors holding a document in memory.
    pub documents_loaded: AtomicI64,
    /// Changes committed since start.
    pub changes_committed: AtomicU64,
    /// Document commits since start (one per document per group commit; several documents'
    /// commits share one SQLite transaction: see `store_transactions`).
    pub commits: AtomicU64,
    /// SQLite write transactions since start: one fsync each, holding the commits of every
    /// document that was queued for the store's writer at the time.
    pub store_transactions: AtomicU64,
    /// Transactions whose writer lingered for the commit window to gather other documents'
    /// writes (see `storage::write_loop`).
    pub store_lingers: AtomicU64,
    /// Bytes received in WebSocket frames.
    pub bytes_in: AtomicU64,
    /// Bytes sent in WebSocket frames.
    pub bytes_out: AtomicU64,
    /// Automerge sync messages with changes that a document received together with others
    /// (queued back to back from different connections: one apply for all their changes).
    pub automerge_applied_together: AtomicU64,
    /// Yrs changes relayed to the other writers while the commit before them was in flight.
    pub yrs_relayed_during_commit: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    errors: [AtomicU64; CODES],
    /// Invariant loop counters by (rule kind, policy, outcome); behind a lock taken only when a
    /// violation is found, never on the commit path of a healthy document.
    invariants: std::sync::Mutex<std::collections::BTreeMap<(String, String, &'static str), u64>>,
    repair_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    repair_count: AtomicU64,
    repair_sum_micros: AtomicU64,
}

impl Metrics {
    /// Records one commit transaction's latency.
    pub fn observe_commit(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Counts one event of the invariant loop: `outcome` is "found", "resolved" or "asked".
    pub fn count_invariant(&self, kind: &str, policy: &str, outcome: &'static str) {
        if let Ok(mut map) = self.invariants.lock() {
            *map.entry((kind.to_owned(), policy.to_owned(), outcome))
                .or_default() += 1;
        }
    }

    /// Invariant loop events so far for (kind, policy, outcome).
    pub fn invariant_count(&self, kind: &str, policy: &str, outcome: &'static str) -> u64 {
        self.invariants
            .lock()
            .map(|m| {
                m.get(&(kind.to_owned(), policy.to_owned(), outcome))
                    .copied()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// Records the time from detecting a violation to its repair being durable.
    pub fn observe_repair(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.repair_buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.repair_count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.repair_sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Records an error or rejection sent to a client.
    pub fn count_error(&self, code: ErrorCode) {
        self.error_counter(code).fetch_add(1, Ordering::Relaxed);
    }

    /// Errors sent with `code` so far (codes past the tracked range share one counter).
    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.error_counter(code).load(Ordering::Relaxed)
    }

    /// The counter of `code`; unknown codes share slot 0.
    fn error_counter(&self, code: ErrorCode) -> &AtomicU64 {
        let index = usize::from(code.code());
        &self.errors[if index < CODES { index } else { 0 }]
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let scalars: [(&str, &str, &str, String); 9] = [
            (
                "accord_connections",
                "gauge",
                "Open WebSocket connections.",
                self.connections.load(Ordering::Relaxed).to_string(),
            ),
            (
                "accord_documents_loaded",
                "gauge",
                "Documents held in memory.",
                self.documents_loaded.load(Ordering::Relaxed).to_string(),
            ),
            (
                "accord_changes_committed_total",
                "counter",
                "Changes durably committed.",
                self.changes_committed.load(Ordering::Relaxed).to_string(),
            ),
            (
                "accord_store_transactions_total",
                "counter",
                "SQLite write transactions (one fsync each; a group commit across documents).",
                self.store_transactions.load(Ordering::Relaxed).to_string(),
            ),
            (
                "accord_store_lingers_total",
                "counter",
                "Write transactions that waited the commit window for other documents' writes.",
                self.store_lingers.load(Ordering::Relaxed).to_string(),
            ),
            (
                "accord_bytes_in_total",
                "counter",
                "Bytes received in WebSocket frames.",
                self.bytes_in.load(Ordering::Relaxed).to_string(),
            ),
            (
                "accord_bytes_out_total",
                "counter",
                "Bytes sent in WebSocket frames.",
                self.bytes_out.load(Ordering::Relaxed).to_string(),
            ),
            (
                "accord_automerge_applied_together_total",
                "counter",
                "Automerge sync messages whose changes were applied together with others'.",
                self.automerge_applied_together
                    .load(Ordering::Relaxed)
                    .to_string(),
            ),
            (
                "accord_yrs_relayed_during_commit_total",
                "counter",
                "Yrs changes relayed to the other writers while the commit before them was in flight.",
                self.yrs_relayed_during_commit
                    .load(Ordering::Relaxed)
                    .to_string(),
            ),
        ];
        for (name, kind, help, value) in scalars {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let name = "accord_commit_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Latency of one commit transaction (group commit).\n# TYPE {name} histogram"
        );
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
        let name = "accord_invariant_events_total";
        let _ = writeln!(
            out,
            "# HELP {name} Invariant violations found, resolved by a fact, or asked of a person, by rule kind and policy.\n# TYPE {name} counter"
        );
        if let Ok(map) = self.invariants.lock() {
            for ((kind, policy, outcome), value) in map.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{kind=\"{kind}\",policy=\"{policy}\",outcome=\"{outcome}\"}} {value}"
                );
            }
        }
        let name = "accord_repair_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} From detecting a violation to its repair being durable.\n# TYPE {name} histogram"
        );
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.repair_buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.repair_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.repair_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
        let name = "accord_errors_total";
        let _ = writeln!(
            out,
            "# HELP {name} Errors and rejections sent, by code.\n# TYPE {name} counter"
        );
        for (index, value) in self.errors.iter().enumerate() {
            let label = ErrorCode::from_code(index as u16).label();
            let _ = writeln!(
                out,
                "{name}{{code=\"{label}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }
        out
    }
}
