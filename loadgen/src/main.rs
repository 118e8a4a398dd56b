//! `accord-loadgen`: measures an accord-server on 127.0.0.1.
//!
//! - `commits`: N writer connections each send small Yrs changes as fast as acknowledgements
//!   allow (at most `--window` unacknowledged per connection) and count the changes the server
//!   acknowledged, which it does only after their SQLite transaction committed (durable,
//!   `synchronous=FULL`).
//! - `fanout`: one document, `--subscribers` live subscribers and a few paced writers; measures
//!   the time from a writer sending a change to each subscriber receiving it (p50/p99) and the
//!   delivered updates per second.
//! - `yws-fanout`, `yws-docs`, `yws-idle`: the same kind of load over the y-websocket protocol,
//!   so it can be applied unchanged to Accord's `/yjs` and to other Yjs servers (`--target`, with
//!   `{room}` in the URL; `--proto hocuspocus` for Hocuspocus); see `yws.rs` and `bench/run.sh`.
//! - `am-typists`: `--typists` thin automerge-repo clients typing into one Automerge document, for
//!   Accord's `/automerge` or automerge-repo-sync-server (`--target`); see `amtypists.rs`.
//!
//! `commits --trip-changes` sends changes shaped like the demo trip document instead (each adds a
//! wallet ledger entry, a seat booking and a payment, after a first change that declares the
//! document type `trip`), and `--schema FILE` gives the embedded server invariants to check on
//! every commit (`sync-server/examples/trip.schema.json`): the two runs differ only by the
//! invariant checks, which is how the invariant layer's cost on commit throughput is measured.
//!
//! The changes are generated before the clock starts (real Yrs updates made by the engine's
//! `Document`), and the generator speaks the wire protocol directly, so the measured cost is the
//! server's. Every loop is bounded by `--duration` (plus a grace period to drain) and by
//! `--max-changes`. Traffic goes to 127.0.0.1 only: an embedded server on a temporary data
//! directory (auth off), or `--url ws://127.0.0.1:PORT/sync`.

mod amtypists;
mod conn;
mod relay;
mod yws;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use accord_engine::protocol::{Message, SyncPayload};
use accord_engine::{Change, ChangeId, DocKind, Document, DocumentId, Op, Path, ReplicaId};
use accord_server::metrics::Metrics;
use clap::{Parser, ValueEnum};
use tokio::sync::{watch, Barrier};
use tokio::time::{timeout_at, Instant};

use conn::{Conn, Result};

/// Time allowed after `--duration` for acknowledgements and deliveries still in flight.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Durable acknowledged changes per second.
    Commits,
    /// Writer-to-subscriber latency with many subscribers of one document.
    Fanout,
    /// Both, one after the other.
    All,
    /// y-websocket protocol (any server, `--target`): fan-out, stepping through `--rates`.
    YwsFanout,
    /// y-websocket protocol: `--docs` rooms x `--clients-per-doc` clients typing lightly.
    YwsDocs,
    /// y-websocket protocol: `--connections` idle connections.
    YwsIdle,
    /// automerge-repo protocol (any server, `--target`; Accord's `/automerge` or
    /// automerge-repo-sync-server): `--typists` thin clients typing `--type-rate` characters a
    /// second each into one document (see `amtypists.rs`).
    AmTypists,
    /// Accord's own protocol (`--url` of a running server, with `--server-pid`): `--connections`
    /// idle connections, each subscribed to one of `--rooms` Yrs documents.
    Idle,
    /// Not a load: serves, on 127.0.0.1:`--port`, a y-websocket relay that does no document work
    /// (each update forwarded as it came to the room's other clients), the floor the fan-out
    /// load is measured against (see `relay.rs`). Runs until killed.
    RelayFloor,
}

/// Load generator for accord-server (traffic to 127.0.0.1 only).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Which measurement to run.
    #[arg(value_enum, default_value = "all")]
    scenario: Scenario,
    /// Target a running server (`ws://127.0.0.1:PORT/sync`, run it with --no-auth) instead of
    /// starting one in this process on a temporary data directory.
    #[arg(long)]
    url: Option<String>,
    /// A quick run with small numbers (for CI): a few seconds in all.
    #[arg(long)]
    smoke: bool,
    /// Seconds each scenario sends changes for.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Changes generated (and sent at most) per scenario.
    #[arg(long, default_value_t = 1_000_000)]
    max_changes: usize,
    /// commits: writer connections.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// commits: documents the writers spread over (0: one per writer).
    #[arg(long, default_value_t = 0)]
    documents: usize,
    /// Unacknowledged changes each writer keeps in flight at most.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// fanout: subscribers of the document.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// fanout: writers of the document.
    #[arg(long, default_value_t = 4)]
    fanout_writers: usize,
    /// fanout: changes per second, all writers together.
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// yws-*: the server's URL, `{room}` replaced by the room (e.g.
    /// `ws://127.0.0.1:8787/yjs/{room}`); without it, the embedded Accord server's `/yjs/{room}`.
    #[arg(long)]
    target: Option<String>,
    /// yws-*: the framing (`hocuspocus` prefixes the document name and authenticates first).
    #[arg(long, value_enum, default_value = "yws")]
    proto: yws::Proto,
    /// yws-*: the server's process id, for its RSS and CPU (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// A label for the server in the printed table.
    #[arg(long, default_value = "server")]
    label: String,
    /// yws-fanout: the writers' total rates (changes/s) to step through; stops after two steps
    /// in a row over `--p99-ms` (or losing deliveries).
    #[arg(long, value_delimiter = ',', default_value = "200,500,1000")]
    rates: Vec<f64>,
    /// yws-fanout: the latency bound of a passing step.
    #[arg(long, default_value_t = 100.0)]
    p99_ms: f64,
    /// yws-docs: rooms.
    #[arg(long, default_value_t = 1_000)]
    docs: usize,
    /// yws-docs: clients per room.
    #[arg(long, default_value_t = 3)]
    clients_per_doc: usize,
    /// yws-docs: milliseconds between one client's keystrokes.
    #[arg(long, default_value_t = 2_000)]
    type_interval_ms: u64,
    /// yws-docs: batches of `--docs` rooms, each connected and typing for `--duration` while
    /// the earlier ones keep typing; the last batch's RSS growth per room is printed as
    /// `marginal_bytes_per_doc` (the cost of one more room, without the fixed costs).
    #[arg(long, default_value_t = 1)]
    batches: usize,
    /// yws-idle, idle: connections.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// yws-idle, idle: rooms (documents) the connections spread over.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// am-typists: typists.
    #[arg(long, default_value_t = 8)]
    typists: usize,
    /// am-typists: characters each typist types per second.
    #[arg(long, default_value_t = 6.0)]
    type_rate: f64,
    /// relay-floor: the port to listen on (127.0.0.1).
    #[arg(long, default_value_t = 9420)]
    port: u16,
    /// Worker threads of the embedded server's runtime.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// commits: changes shaped like the demo trip document (typed `trip`; each adds a ledger
    /// entry, a booking and a payment, all valid) instead of small overwrites of 16 keys.
    #[arg(long)]
    trip_changes: bool,
    /// The embedded server checks the invariants of this schema (JSON, e.g.
    /// `sync-server/examples/trip.schema.json`) on documents of its type.
    #[arg(long)]
    schema: Option<std::path::PathBuf>,
}

impl Args {
    fn apply_smoke(&mut self) {
        if self.smoke {
            self.duration = self.duration.min(1.5);
            self.max_changes = self.max_changes.min(20_000);
            self.writers = self.writers.min(4);
            self.subscribers = self.subscribers.min(20);
            self.fanout_writers = self.fanout_writers.min(2);
            self.rate = self.rate.min(500.0);
            self.rates.truncate(2);
            self.docs = self.docs.min(20);
            self.connections = self.connections.min(200);
            self.typists = self.typists.min(4);
        }
    }
}

fn main() {
    let mut args = Args::parse();
    args.apply_smoke();
    if let Err(error) = real_main(args) {
        eprintln!("accord-loadgen: {error}");
        std::process::exit(1);
    }
}

fn real_main(args: Args) -> Result<()> {
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        return Err("--duration must be in (0, 3600] seconds".into());
    }
    if args.writers == 0 || args.fanout_writers == 0 || args.window == 0 || args.rate <= 0.0 {
        return Err("--writers, --fanout-writers, --window and --rate must be positive".into());
    }
    if args.scenario == Scenario::RelayFloor {
        return relay_floor_main(args.port);
    }
    let yws_scenario = matches!(
        args.scenario,
        Scenario::YwsFanout | Scenario::YwsDocs | Scenario::YwsIdle
    );
    if yws_scenario && args.target.is_some() {
        return yws_main(&args, args.target.clone().unwrap_or_default());
    }
    if args.scenario == Scenario::AmTypists {
        if let Some(target) = args.target.clone() {
            return am_typists_main(&args, target);
        }
    }
    let schemas = match &args.schema {
        Some(path) => {
            if args.url.is_some() {
                return Err("--schema configures the embedded server: not with --url".into());
            }
            let json = std::fs::read_to_string(path)
                .map_err(|e| format!("--schema {}: {e}", path.display()))?;
            let schema = accord_engine::invariant::Schema::from_json(&json)
                .map_err(|e| format!("--schema {}: {e}", path.display()))?;
            vec![schema]
        }
        None => Vec::new(),
    };
    let server = match &args.url {
        Some(url) => {
            check_local(url)?;
            None
        }
        None => Some(EmbeddedServer::start(args.server_threads, schemas)?),
    };
    let url = args
        .url
        .clone()
        .or_else(|| server.as_ref().map(|s| s.url.clone()))
        .ok_or("no server")?;
    let runtime = two_worker_runtime()?;
    let metrics = server.as_ref().map(|s| s.metrics.clone());
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let run_id = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    if yws_scenario {
        let target = url.replace("/sync", "/yjs/{room}");
        drop(runtime);
        let mut args = args;
        args.server_pid = None;
        let result = yws_main(&args, target);
        if let Some(server) = server {
            server.stop();
        }
        return result;
    }
    if args.scenario == Scenario::AmTypists {
        drop(runtime);
        let mut args = args;
        args.server_pid = None;
        let result = am_typists_main(&args, url.replace("/sync", "/automerge"));
        if let Some(server) = server {
            server.stop();
        }
        return result;
    }
    if args.scenario == Scenario::Idle {
        let result = runtime.block_on(native_idle(&args, &url, run_id));
        drop(runtime);
        if let Some(server) = server {
            server.stop();
        }
        return result;
    }
    let result = runtime.block_on(async {
        if matches!(args.scenario, Scenario::Commits | Scenario::All) {
            commits(&args, &url, run_id, metrics.as_deref(), &mut rows).await?;
        }
        if matches!(args.scenario, Scenario::Fanout | Scenario::All) {
            fanout(&args, &url, run_id, &mut rows).await?;
        }
        Ok::<(), String>(())
    });
    drop(runtime);
    if let Some(server) = server {
        server.stop();
    }
    print_table(&url, &args, &rows);
    result
}

/// `am-typists` against `url` (an automerge-repo WebSocket endpoint on 127.0.0.1).
fn am_typists_main(args: &Args, url: String) -> Result<()> {
    check_local(&url)?;
    let runtime = two_worker_runtime()?;
    let r = runtime.block_on(amtypists::typists(
        &url,
        args.typists,
        args.type_rate,
        args.duration,
        args.server_pid,
    ))?;
    let n = r.typists as f64;
    println!(
        "RESULT am-typists {} n={} typed={} seconds={:.1} server_cores={:.3} cores_per_typist={:.4} server_rss_mb={:.1} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} lag_chars_at_stop={} caught_up={} catch_up_s={:.2} loadgen_cores={:.2}",
        args.label,
        r.typists,
        r.typed,
        r.seconds,
        r.server_cores,
        r.server_cores / n,
        r.server_rss as f64 / 1e6,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.lag_at_stop,
        r.caught_up,
        r.catch_up_s,
        r.loadgen_cores
    );
    if !r.caught_up {
        return Err(format!(
            "am-typists: not every keystroke reached every typist ({} missing at the stop)",
            r.lag_at_stop
        ));
    }
    Ok(())
}

/// The load generator's runtime: two worker threads, as many as Accord's server runs by
/// default (and the machine's cores).
fn two_worker_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// `relay-floor`: the relay on the same runtime as the loads.
fn relay_floor_main(port: u16) -> Result<()> {
    let runtime = two_worker_runtime()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))?;
        println!("relay-floor listening on ws://127.0.0.1:{port}/{{room}}");
        relay::serve(listener).await
    })
}

fn yws_main(args: &Args, template: String) -> Result<()> {
    check_local(&template)?;
    let target = yws::Target {
        template: template.clone(),
        proto: args.proto,
        server_pid: args.server_pid,
    };
    let runtime = two_worker_runtime()?;
    let label = &args.label;
    runtime.block_on(async {
        match args.scenario {
            Scenario::YwsFanout => {
                println!("yws-fanout {label} {template}: {} subscribers, {} writers, {}s per step", args.subscribers, args.fanout_writers, args.duration);
                println!("| server | rate (changes/s) | sent | delivered / expected | lost subs | delivered updates/s | p50 / p99 / max (ms) | server CPU (cores) | server RSS (MB) | loadgen CPU (cores) | updates per frame |");
                println!("|---|---|---|---|---|---|---|---|---|---|---|");
                let mut best: Option<yws::FanoutStep> = None;
                let mut failed_in_a_row = 0;
                for (i, &rate) in args.rates.iter().enumerate() {
                    let s = yws::fanout_step(&target, args.subscribers, args.fanout_writers, rate, args.duration, i).await?;
                    println!(
                        "| {label} | {:.0} | {} | {} / {} | {} | {:.0} | {:.1} / {:.1} / {:.1} | {:.2} | {:.1} | {:.2} | {:.1} |",
                        s.rate, s.sent, s.delivered, s.expected, s.lost, s.per_sec, s.p50, s.p99, s.max, s.cpu, s.rss_mb, s.own_cpu,
                        s.delivered as f64 / s.frames.max(1) as f64
                    );
                    // The same step for bench/node/summary.mjs, which checks issue 8's p99
                    // target at the step where Accord delivers 5x the best peer.
                    println!(
                        "RESULT fanout-step {label} rate={:.0} updates_per_s={:.0} p50_ms={:.1} p99_ms={:.1} ok={}",
                        s.rate, s.per_sec, s.p50, s.p99, s.ok(args.p99_ms)
                    );
                    // Two failing steps in a row end the climb (one may be noise on a shared
                    // machine).
                    if s.ok(args.p99_ms) {
                        failed_in_a_row = 0;
                        if best.as_ref().is_none_or(|b| s.per_sec > b.per_sec) {
                            best = Some(s);
                        }
                    } else {
                        failed_in_a_row += 1;
                        if failed_in_a_row >= 2 {
                            break;
                        }
                    }
                }
                match best {
                    Some(b) => println!("RESULT fanout {label} best_updates_per_s={:.0} p99_ms={:.1} rate={:.0} cpu={:.2} loadgen_cpu={:.2}", b.per_sec, b.p99, b.rate, b.cpu, b.own_cpu),
                    None => println!("RESULT fanout {label} best_updates_per_s=0 p99_ms=NaN rate=0 cpu=NaN"),
                }
            }
            Scenario::YwsIdle => {
                let r = yws::idle(&target, args.connections, args.rooms, args.duration).await?;
                let per = (r.rss_after as f64 - r.rss_before as f64) / r.connections.max(1) as f64;
                println!("RESULT idle {label} connections={} rss_before_mb={:.1} rss_after_mb={:.1} bytes_per_conn={:.0} connect_s={:.1}", r.connections, r.rss_before as f64 / 1e6, r.rss_after as f64 / 1e6, per, r.connect_secs);
            }
            Scenario::YwsDocs => {
                let r = yws::docs(
                    &target,
                    args.docs,
                    args.clients_per_doc,
                    args.type_interval_ms,
                    args.duration,
                    args.batches,
                )
                .await?;
                let (Some(first), Some(last)) = (r.batches.first(), r.batches.last()) else {
                    return Err("docs: no batch ran".to_string());
                };
                let per = |b: &yws::DocsBatch| {
                    (b.rss_after as f64 - b.rss_before as f64) / r.docs.max(1) as f64
                };
                // The first batch's figures keep their names; later batches add the marginal.
                let marginal = if r.batches.len() > 1 {
                    format!(
                        " batches={} rss_end_mb={:.1} marginal_bytes_per_doc={:.0} marginal_cpu_cores={:.3}",
                        r.batches.len(),
                        last.rss_after as f64 / 1e6,
                        per(last),
                        last.cpu_cores
                    )
                } else {
                    String::new()
                };
                println!("RESULT docs {label} docs={} clients={} rss_before_mb={:.1} rss_after_mb={:.1} bytes_per_doc={:.0} cpu_cores={:.3} typed={} received={}{marginal}", r.docs, r.clients, first.rss_before as f64 / 1e6, first.rss_after as f64 / 1e6, per(first), first.cpu_cores, r.typed, r.received);
            }
            _ => {}
        }
        Ok::<(), String>(())
    })
}

/// `idle`: native connections that said hello and subscribed, then hold still; the server's RSS
/// after minus before, per connection (needs `--server-pid`).
async fn native_idle(args: &Args, url: &str, run_id: u64) -> Result<()> {
    let Some(pid) = args.server_pid else {
        return Err("idle needs --url and --server-pid (the server's RSS is measured)".into());
    };
    let before = yws::proc_usage(Some(pid)).map_or(0, |u| u.1);
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(128));
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let (url, sem) = (url.to_string(), sem.clone());
        let room = (i % args.rooms.max(1)) as u64;
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
            let mut replica = [0x80u8; 16];
            replica[8..].copy_from_slice(&(i as u64).to_le_bytes());
            let mut conn = Conn::open(&url, ReplicaId::from_bytes(replica)).await?;
            conn.subscribe(document_id(run_id, (1 << 20) + room))
                .await?;
            Ok::<Conn, String>(conn)
        }));
    }
    let mut held = Vec::with_capacity(args.connections);
    for task in tasks {
        held.push(task.await.map_err(|e| e.to_string())??);
    }
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "idle: {} connected in {connect_secs:.1}s; holding {}s",
        held.len(),
        args.duration
    );
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let after = yws::proc_usage(Some(pid)).map_or(0, |u| u.1);
    let n = held.len();
    drop(held);
    let per = (after as f64 - before as f64) / n.max(1) as f64;
    println!(
        "RESULT native-idle {} connections={n} rss_before_mb={:.1} rss_after_mb={:.1} bytes_per_conn={per:.0} connect_s={connect_secs:.1}",
        args.label,
        before as f64 / 1e6,
        after as f64 / 1e6
    );
    Ok(())
}

fn check_local(url: &str) -> Result<()> {
    let ok = [
        "ws://127.0.0.1:",
        "ws://localhost:",
        "ws://127.0.0.1/",
        "ws://localhost/",
    ]
    .iter()
    .any(|p| url.starts_with(p));
    if ok {
        Ok(())
    } else {
        Err(format!("--url must point at 127.0.0.1 (got {url})"))
    }
}

/// An accord-server on its own runtime and threads, on a temporary data directory.
struct EmbeddedServer {
    url: String,
    metrics: Arc<Metrics>,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<()>>,
    _data: tempfile::TempDir,
}

impl EmbeddedServer {
    fn start(threads: usize, schemas: Vec<accord_engine::invariant::Schema>) -> Result<Self> {
        let data = tempfile::tempdir().map_err(|e| e.to_string())?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mut config = accord_server::Config::new(
            data.path().join("server"),
            accord_server::auth::AuthMode::Disabled,
        );
        config.schemas = schemas;
        let metrics = Arc::new(Metrics::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server_metrics = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("accord-server".into())
            .spawn(move || -> Result<()> {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads.max(1))
                    .thread_name("server-worker")
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
                    accord_server::run_with_metrics(listener, config, server_metrics, async move {
                        let _ = stopped.await;
                    })
                    .await
                    .map_err(|e| e.to_string())
                })
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            url: format!("ws://{addr}/sync"),
            metrics,
            stop,
            thread,
            _data: data,
        })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        match self.thread.join() {
            Ok(Err(error)) => eprintln!("server: {error}"),
            Err(_) => eprintln!("server thread panicked"),
            Ok(Ok(())) => {}
        }
    }
}

/// `count` small Yrs changes by one writer: each sets one of 16 keys, so the document stays
/// small however many changes it gets (overwritten values are garbage-collected).
fn generate(writer: u64, run_id: u64, document: DocumentId, count: usize) -> Result<Vec<Change>> {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&run_id.to_le_bytes());
    id[8..].copy_from_slice(&writer.to_le_bytes());
    let mut doc = Document::new(DocKind::Yrs, ReplicaId::from_bytes(id), document);
    let mut changes = Vec::with_capacity(count);
    for i in 0..count {
        let op = Op::Put {
            path: Path::keys(["m".to_string(), format!("k{}", i % 16)]),
            value: serde_json::json!(i),
        };
        match doc.apply_ops(&[op]) {
            Ok(Some(change)) => changes.push(change),
            Ok(None) => {}
            Err(e) => return Err(format!("generate: {:?}", e.error)),
        }
    }
    Ok(changes)
}

/// CPU seconds (user + system) the embedded server used so far: this process's, less its own
/// threads' (the main thread and its runtime's workers). Counting the other way round (the
/// server's threads) would miss the time of server threads that have exited. Linux only (`/proc`);
/// `None` elsewhere.
fn server_cpu_seconds() -> Option<f64> {
    let ticks = |stat: &str| -> Option<f64> {
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the command: utime and stime are fields 14 and 15 (1-based) → index 11, 12.
        Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
    };
    let total = ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    let mut own = 0.0;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm == "accord-loadgen" || comm.starts_with("tokio-rt-worker") {
            if let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) {
                own += ticks(&stat).unwrap_or(0.0);
            }
        }
    }
    // Ticks are 1/100 s on Linux (USER_HZ).
    Some((total - own) / 100.0)
}

/// The document type [`generate_trip`] declares (the demo schema's).
const TRIP_TYPE: &str = "trip";

/// `count` Yrs changes by one writer shaped like the demo trip document: the first declares the
/// type and makes the collections; each next one adds a wallet entry (deposits of 2 and spends of
/// 1, alternating, so the balance never goes below zero), a booking of a seat no one else holds
/// and a payment with a new reference. Every invariant of `trip.schema.json` that watches these
/// paths (range with a fold, unique, once) is touched by every change and none breaks.
fn generate_trip(
    writer: u64,
    run_id: u64,
    document: DocumentId,
    count: usize,
) -> Result<Vec<Change>> {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&run_id.to_le_bytes());
    id[8..].copy_from_slice(&writer.to_le_bytes());
    let mut doc = Document::new(DocKind::Yrs, ReplicaId::from_bytes(id), document);
    let mut changes = Vec::with_capacity(count);
    let key = |root: &str, collection: &str, entry: String| {
        Path::keys([root.to_string(), collection.to_string(), entry])
    };
    for i in 0..count {
        let ops = if i == 0 {
            vec![
                accord_engine::invariant::type_op(DocKind::Yrs, TRIP_TYPE),
                Op::Put {
                    path: Path::keys(["wallet"]),
                    value: serde_json::json!({"entries": {}}),
                },
                Op::Put {
                    path: Path::keys(["trip"]),
                    value: serde_json::json!({"status": "planning", "bookings": {}, "payments": {}}),
                },
            ]
        } else {
            let (amount, kind) = if i % 2 == 1 {
                (2, "deposit")
            } else {
                (1, "spend")
            };
            let tag = format!("w{writer}-{i}");
            vec![
                Op::Put {
                    path: key("wallet", "entries", format!("e{tag}")),
                    value: serde_json::json!({"amount": amount, "kind": kind}),
                },
                Op::Put {
                    path: key("trip", "bookings", format!("b{tag}")),
                    value: serde_json::json!({"seat": format!("s{tag}")}),
                },
                Op::Put {
                    path: key("trip", "payments", format!("p{tag}")),
                    value: serde_json::json!({"ref": format!("r{tag}"), "amount": 1}),
                },
            ]
        };
        match doc.apply_ops(&ops) {
            Ok(Some(change)) => changes.push(change),
            Ok(None) => {}
            Err(e) => return Err(format!("generate: {:?}", e.error)),
        }
    }
    Ok(changes)
}

fn document_id(run_id: u64, n: u64) -> DocumentId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&run_id.to_le_bytes());
    id[8..].copy_from_slice(&n.wrapping_add(1 << 40).to_le_bytes());
    DocumentId::from_random_bytes(id)
}

#[derive(Default)]
struct WriterStats {
    sent: usize,
    acked: usize,
    rejected: usize,
    /// Send-to-ack latencies in microseconds.
    ack_micros: Vec<u32>,
    finished: Option<Instant>,
}

/// Where a writer records the send time of change `index` (fan-out latency).
struct SendLog {
    epoch: Instant,
    sent_at: Vec<AtomicU64>,
    /// (Yrs client, first clock of the change) → index. The server relays a change re-encoded
    /// against its state (so not byte for byte, and not with the same hash), but its Yrs ids
    /// are the writer's.
    index: HashMap<(u64, u32), u32>,
}

/// The Yrs identity of a single-client update: its client and its first clock.
fn update_key(bytes: &[u8]) -> Option<(u64, u32)> {
    use yrs::updates::decoder::Decode;
    let update = yrs::Update::decode_v1(bytes).ok()?;
    let sv = update.state_vector_lower();
    sv.iter()
        .map(|(client, clock)| (client.get(), *clock))
        .min_by_key(|(_, clock)| *clock)
}

/// One writer connection: sends `changes` keeping at most `window` unacknowledged, paced by
/// `period` if given, until `stop_sending`; then waits for the rest of its acks until `hard`.
#[allow(clippy::too_many_arguments)]
async fn writer(
    url: String,
    writer_id: u64,
    document: DocumentId,
    changes: Vec<Change>,
    window: usize,
    period: Option<Duration>,
    start: Arc<Barrier>,
    until: Duration,
    log: Option<(Arc<SendLog>, usize)>,
) -> Result<WriterStats> {
    let replica = ReplicaId::from_bytes([writer_id as u8; 16]);
    let mut conn = Conn::open(&url, replica).await?;
    conn.subscribe(document).await?;
    start.wait().await;
    let begun = Instant::now();
    let stop_sending = begun + until;
    let hard = stop_sending + GRACE;
    let mut stats = WriterStats::default();
    let mut inflight: HashMap<ChangeId, Instant> = HashMap::with_capacity(window * 2);
    let mut next = 0;
    let mut ticker = period.map(|p| {
        let mut t = tokio::time::interval(p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut may_send = ticker.is_none();
    loop {
        let now = Instant::now();
        let sending = now < stop_sending && next < changes.len();
        if sending && may_send {
            let mut fed = false;
            while inflight.len() < window && next < changes.len() {
                let change = &changes[next];
                if let Some((log, base)) = &log {
                    let at = log.epoch.elapsed().as_nanos() as u64;
                    log.sent_at[base + next].store(at, Ordering::Relaxed);
                }
                conn.feed(&Message::Sync {
                    document,
                    payload: SyncPayload::YrsUpdate(change.bytes.clone()),
                })
                .await?;
                inflight.insert(change.id, Instant::now());
                next += 1;
                fed = true;
                if ticker.is_some() {
                    may_send = false;
                    break;
                }
            }
            if fed {
                conn.flush().await?;
            }
        }
        if !sending && inflight.is_empty() {
            break;
        }
        if now >= hard {
            break;
        }
        let wake = if sending { stop_sending } else { hard };
        let message = tokio::select! {
            _ = async {
                match ticker.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }, if !may_send => {
                may_send = true;
                continue;
            }
            received = timeout_at(wake, conn.next()) => match received {
                Ok(message) => message?,
                Err(_) => continue,
            },
        };
        match message {
            Message::Ack { commits, .. } => {
                let now = Instant::now();
                for commit in commits {
                    if let Some(sent) = inflight.remove(&commit.change) {
                        stats.acked += 1;
                        stats.finished = Some(now);
                        let micros = now.duration_since(sent).as_micros();
                        stats.ack_micros.push(micros.min(u32::MAX as u128) as u32);
                    }
                }
            }
            Message::Reject { change, reason, .. } if inflight.remove(&change).is_some() => {
                stats.rejected += 1;
                eprintln!("writer {writer_id}: change rejected: {reason}");
            }
            Message::Error { code, message, .. } => {
                return Err(format!(
                    "writer {writer_id}: server error {code:?}: {message}"
                ));
            }
            _ => {}
        }
    }
    stats.sent = next;
    conn.close().await;
    Ok(stats)
}

/// Waits until every task reached `barrier`; if one failed first (so the barrier would never
/// open), returns its error at once.
async fn all_ready<T>(
    barrier: &Barrier,
    tasks: &mut [tokio::task::JoinHandle<Result<T>>],
    what: &str,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let wait = barrier.wait();
    tokio::pin!(wait);
    loop {
        if tokio::time::timeout(Duration::from_millis(100), &mut wait)
            .await
            .is_ok()
        {
            return Ok(());
        }
        if tasks.iter().any(|t| t.is_finished()) || Instant::now() >= deadline {
            break;
        }
    }
    for task in tasks.iter_mut().filter(|t| t.is_finished()) {
        if let Ok(Err(error)) = task.await {
            return Err(format!("{what}: {error}"));
        }
    }
    Err(format!("{what} did not get ready in time"))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

async fn commits(
    args: &Args,
    url: &str,
    run_id: u64,
    metrics: Option<&Metrics>,
    rows: &mut Vec<(String, String, String)>,
) -> Result<()> {
    let documents = if args.documents == 0 {
        args.writers
    } else {
        args.documents
    };
    let per_writer = args.max_changes / args.writers;
    eprintln!(
        "commits: generating {} changes for {} writers...",
        per_writer * args.writers,
        args.writers
    );
    let generated = Instant::now();
    let mut batches = Vec::new();
    for w in 0..args.writers {
        let document = document_id(run_id, (w % documents) as u64);
        let changes = if args.trip_changes {
            generate_trip(w as u64, run_id, document, per_writer)?
        } else {
            generate(w as u64, run_id, document, per_writer)?
        };
        batches.push((document, changes));
    }
    eprintln!(
        "commits: generated in {:.1}s; running for {}s",
        generated.elapsed().as_secs_f64(),
        args.duration
    );
    let before = metrics.map(|m| {
        (
            m.changes_committed.load(Ordering::Relaxed),
            m.commits.load(Ordering::Relaxed),
            m.store_transactions.load(Ordering::Relaxed),
        )
    });
    let start = Arc::new(Barrier::new(args.writers + 1));
    let until = Duration::from_secs_f64(args.duration);
    let cpu_before = metrics.and_then(|_| server_cpu_seconds());
    let mut tasks = Vec::new();
    for (w, (document, changes)) in batches.into_iter().enumerate() {
        tasks.push(tokio::spawn(writer(
            url.to_string(),
            w as u64 + 1,
            document,
            changes,
            args.window,
            None,
            start.clone(),
            until,
            None,
        )));
    }
    all_ready(&start, &mut tasks, "commits writers").await?;
    let begun = Instant::now();
    let mut total = WriterStats::default();
    let mut last = begun;
    for task in tasks {
        let stats = task.await.map_err(|e| e.to_string())??;
        total.sent += stats.sent;
        total.acked += stats.acked;
        total.rejected += stats.rejected;
        total.ack_micros.extend(stats.ack_micros);
        if let Some(finished) = stats.finished {
            last = last.max(finished);
        }
    }
    let elapsed = last.duration_since(begun).as_secs_f64().max(1e-9);
    let server_cpu = cpu_before
        .zip(server_cpu_seconds())
        .map(|(before, after)| after - before);
    total.ack_micros.sort_unstable();
    let s = "commits".to_string();
    rows.push((
        s.clone(),
        "writers x window".into(),
        format!("{} x {}", args.writers, args.window),
    ));
    rows.push((s.clone(), "documents".into(), documents.to_string()));
    rows.push((
        s.clone(),
        "changes".into(),
        if args.trip_changes {
            "trip (ledger entry + booking + payment)".into()
        } else {
            "16-key overwrites".into()
        },
    ));
    rows.push((
        s.clone(),
        "invariants checked".into(),
        args.schema
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string()),
    ));
    rows.push((
        s.clone(),
        "changes sent / acked".into(),
        format!("{} / {}", total.sent, total.acked),
    ));
    rows.push((s.clone(), "rejected".into(), total.rejected.to_string()));
    rows.push((s.clone(), "elapsed (s)".into(), format!("{elapsed:.2}")));
    rows.push((
        s.clone(),
        "durable acked changes/s".into(),
        format!("{:.0}", total.acked as f64 / elapsed),
    ));
    rows.push((
        s.clone(),
        "ack latency p50 / p99 (ms)".into(),
        format!(
            "{:.2} / {:.2}",
            percentile(&total.ack_micros, 50.0),
            percentile(&total.ack_micros, 99.0)
        ),
    ));
    if let Some(cpu) = server_cpu {
        rows.push((
            s.clone(),
            "server CPU per acked change (us)".into(),
            format!("{:.1}", cpu * 1e6 / total.acked.max(1) as f64),
        ));
    }
    if let (Some(m), Some((changes0, commits0, txns0))) = (metrics, before) {
        let changes = m.changes_committed.load(Ordering::Relaxed) - changes0;
        let commits = m.commits.load(Ordering::Relaxed) - commits0;
        let txns = m.store_transactions.load(Ordering::Relaxed) - txns0;
        rows.push((
            s.clone(),
            "document commits / SQLite transactions".into(),
            format!("{commits} / {txns}"),
        ));
        rows.push((
            s.clone(),
            "changes per transaction".into(),
            format!("{:.1}", changes as f64 / txns.max(1) as f64),
        ));
        if args.schema.is_some() {
            // Violations the server's invariant loop found (0 when every change is valid; a
            // schema every change breaks shows the checks do run).
            let mut found = 0;
            for kind in ["range", "unique", "transitions", "once", "capacity"] {
                for policy in ["auto", "reject", "compensate", "ask"] {
                    found += m.invariant_count(kind, policy, "found");
                }
            }
            rows.push((s, "invariant violations found".into(), found.to_string()));
        }
    }
    if total.acked == 0 {
        return Err("commits: nothing was acknowledged".into());
    }
    Ok(())
}

#[derive(Default)]
struct SubscriberStats {
    delivered: u64,
    micros: Vec<u32>,
    lost: bool,
}

/// One live subscriber: asks for the document's state (so the server relays new changes to
/// it), then times every relayed change until `stop`.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    url: String,
    n: u64,
    document: DocumentId,
    log: Arc<SendLog>,
    ready: Arc<Barrier>,
    delivered: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    hard: Instant,
) -> Result<SubscriberStats> {
    let mut replica = [0xa5u8; 16];
    replica[..8].copy_from_slice(&n.to_le_bytes());
    let mut conn = Conn::open(&url, ReplicaId::from_bytes(replica)).await?;
    conn.subscribe(document).await?;
    // An empty Yrs state vector (no clients): "send me everything, then keep me live".
    conn.send(&Message::Sync {
        document,
        payload: SyncPayload::YrsStep1(vec![0]),
    })
    .await?;
    conn.wait_for(|m| {
        matches!(
            m,
            Message::Sync {
                payload: SyncPayload::YrsStep2(_),
                ..
            }
        )
    })
    .await?;
    ready.wait().await;
    let mut stats = SubscriberStats::default();
    loop {
        let message = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            received = timeout_at(hard, conn.next()) => match received {
                Ok(Ok(message)) => message,
                Ok(Err(error)) => {
                    eprintln!("subscriber {n}: {error}");
                    stats.lost = true;
                    break;
                }
                Err(_) => break,
            },
        };
        if let Message::Sync {
            payload: SyncPayload::YrsUpdate(bytes),
            ..
        } = message
        {
            let now = log.epoch.elapsed().as_nanos() as u64;
            if let Some(index) = update_key(&bytes).and_then(|key| log.index.get(&key).copied()) {
                let sent = log.sent_at[index as usize].load(Ordering::Relaxed);
                stats
                    .micros
                    .push((now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
                stats.delivered += 1;
                delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    conn.close().await;
    Ok(stats)
}

async fn fanout(
    args: &Args,
    url: &str,
    run_id: u64,
    rows: &mut Vec<(String, String, String)>,
) -> Result<()> {
    let document = document_id(run_id, 1 << 20);
    let writers = args.fanout_writers;
    let wanted = (args.rate * args.duration).ceil() as usize + writers;
    let per_writer = wanted.min(args.max_changes) / writers + 1;
    let mut batches = Vec::new();
    let mut index = HashMap::new();
    for w in 0..writers {
        let changes = generate(1000 + w as u64, run_id, document, per_writer)?;
        for (i, change) in changes.iter().enumerate() {
            let key =
                update_key(&change.bytes).ok_or("fanout: a generated update does not decode")?;
            index.insert(key, (w * per_writer + i) as u32);
        }
        batches.push(changes);
    }
    let log = Arc::new(SendLog {
        epoch: Instant::now(),
        sent_at: (0..writers * per_writer)
            .map(|_| AtomicU64::new(0))
            .collect(),
        index,
    });
    let until = Duration::from_secs_f64(args.duration);
    let hard = Instant::now() + until + GRACE + Duration::from_secs(30);
    let ready = Arc::new(Barrier::new(args.subscribers + 1));
    let delivered = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!("fanout: connecting {} subscribers...", args.subscribers);
    let mut subs = Vec::new();
    for n in 0..args.subscribers {
        subs.push(tokio::spawn(subscriber(
            url.to_string(),
            n as u64,
            document,
            log.clone(),
            ready.clone(),
            delivered.clone(),
            stop_rx.clone(),
            hard,
        )));
    }
    // Subscribers connect before the document has content; the writers subscribe after them.
    all_ready(&ready, &mut subs, "fanout subscribers").await?;
    eprintln!(
        "fanout: {} writers at {} changes/s for {}s",
        writers, args.rate, args.duration
    );
    let start = Arc::new(Barrier::new(writers + 1));
    let period = Duration::from_secs_f64(writers as f64 / args.rate);
    let mut tasks = Vec::new();
    for (w, changes) in batches.into_iter().enumerate() {
        tasks.push(tokio::spawn(writer(
            url.to_string(),
            100 + w as u64,
            document,
            changes,
            args.window,
            Some(period),
            start.clone(),
            until,
            Some((log.clone(), w * per_writer)),
        )));
    }
    all_ready(&start, &mut tasks, "fanout writers").await?;
    let begun = Instant::now();
    let mut sent = 0;
    let mut acked = 0;
    for task in tasks {
        let stats = task.await.map_err(|e| e.to_string())??;
        sent += stats.sent;
        acked += stats.acked;
    }
    let expected = (sent * args.subscribers) as u64;
    let drain_until = Instant::now() + GRACE;
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = begun.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let mut micros = Vec::new();
    let mut total = 0;
    let mut lost = 0;
    for sub in subs {
        let stats = sub.await.map_err(|e| e.to_string())??;
        total += stats.delivered;
        lost += usize::from(stats.lost);
        micros.extend(stats.micros);
    }
    micros.sort_unstable();
    let s = "fanout".to_string();
    rows.push((
        s.clone(),
        "subscribers / writers".into(),
        format!("{} / {}", args.subscribers, writers),
    ));
    rows.push((
        s.clone(),
        "changes sent / acked".into(),
        format!("{sent} / {acked}"),
    ));
    rows.push((
        s.clone(),
        "updates delivered / expected".into(),
        format!("{total} / {expected}"),
    ));
    rows.push((s.clone(), "subscribers lost".into(), lost.to_string()));
    rows.push((
        s.clone(),
        "delivered updates/s".into(),
        format!("{:.0}", total as f64 / elapsed.max(1e-9)),
    ));
    rows.push((
        s,
        "latency p50 / p99 / max (ms)".into(),
        format!(
            "{:.2} / {:.2} / {:.2}",
            percentile(&micros, 50.0),
            percentile(&micros, 99.0),
            percentile(&micros, 100.0)
        ),
    ));
    if total == 0 {
        return Err("fanout: nothing was delivered".into());
    }
    Ok(())
}

fn print_table(url: &str, args: &Args, rows: &[(String, String, String)]) {
    println!(
        "accord-loadgen against {url} ({}; duration {}s, max {} changes)",
        if args.url.is_some() {
            "external server"
        } else {
            "embedded server"
        },
        args.duration,
        args.max_changes
    );
    let w1 = rows.iter().map(|r| r.0.len()).max().unwrap_or(8).max(8);
    let w2 = rows.iter().map(|r| r.1.len()).max().unwrap_or(6).max(6);
    println!("| {:w1$} | {:w2$} | value |", "scenario", "metric");
    println!("|{}|{}|-------|", "-".repeat(w1 + 2), "-".repeat(w2 + 2));
    for (scenario, metric, value) in rows {
        println!("| {scenario:w1$} | {metric:w2$} | {value} |");
    }
}
