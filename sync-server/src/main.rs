//! The `accord-server` binary: parses the command line and runs the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use accord_server::auth::{
    admin_token, mint, unix_now, AdminToken, AuthMode, Claims, Rights, Scope,
};
use accord_server::Config;
use clap::{Parser, Subcommand, ValueEnum};

/// Accord's sync server: a WebSocket relay with per-document commit order.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Serve),
    /// Mint an access token (signed with ACCORD_SECRET).
    Token(TokenArgs),
    /// Print the admin token derived from ACCORD_SECRET (for POST /v1/tokens).
    AdminToken(AdminTokenArgs),
}

#[derive(Parser)]
struct AdminTokenArgs {
    /// The signing secret.
    #[arg(long, env = "ACCORD_SECRET", hide_env_values = true)]
    secret: String,
}

#[derive(Parser)]
struct Serve {
    /// Address to listen on (WebSocket at /sync, /healthz, /metrics, the REST API under /v1).
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// Directory of the database (created if missing).
    #[arg(long, default_value = "./accord-data")]
    data_dir: PathBuf,
    /// Secret that signs access tokens (HMAC-SHA256). Required unless --no-auth.
    #[arg(long, env = "ACCORD_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Run without authentication: every client may read and write every document.
    #[arg(long)]
    no_auth: bool,
    /// Largest WebSocket frame accepted and sent, in bytes; larger messages travel in chunks.
    #[arg(long, default_value_t = 1 << 20)]
    max_frame_bytes: usize,
    /// Largest message after joining chunks, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_message_bytes: usize,
    /// Documents one connection may subscribe at once.
    #[arg(long, default_value_t = 1_000)]
    max_documents_per_connection: usize,
    /// Open connections at once; more are refused with Overloaded.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Messages queued for one connection before it is closed as too slow.
    #[arg(long, default_value_t = 4_096)]
    outbound_queue: usize,
    /// Seconds without any frame (pings go out at a third of it) before a connection is closed.
    #[arg(long, default_value_t = 60)]
    idle_timeout_secs: u64,
    /// Seconds a document without subscribers stays in memory.
    #[arg(long, default_value_t = 30)]
    idle_evict_secs: u64,
    /// Changes appended after a snapshot before a new snapshot is stored.
    #[arg(long, default_value_t = 1_000)]
    compact_every: u64,
    /// Largest REST request body, in bytes (larger ones get 413).
    #[arg(long, default_value_t = 1 << 20)]
    max_rest_body_bytes: usize,
    /// REST requests served at once; more get 503 overloaded.
    #[arg(long, default_value_t = 256)]
    max_rest_in_flight: usize,
    /// Admin token for POST /v1/tokens (the token printed by `admin-token` works too).
    #[arg(long, env = "ACCORD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// A JSON file of invariants for one document type (repeat for more types). Documents that
    /// declare that type are reconciled after every commit.
    #[arg(long = "schema", value_name = "FILE")]
    schemas: Vec<std::path::PathBuf>,
    /// Milliseconds between level-triggered re-checks of a document with invariants.
    #[arg(long, default_value_t = 5_000)]
    reconcile_interval_ms: u64,
    /// Milliseconds between two Automerge sync messages to one peer of one document; changes
    /// meanwhile travel together in the next one (0: send after every commit).
    #[arg(long, default_value_t = 75)]
    automerge_sync_interval_ms: u64,
    /// Microseconds the store's writer may linger to commit the writes of several documents in
    /// one transaction (one fsync) while writes of many documents keep coming (0: never).
    #[arg(long, default_value_t = 2_000)]
    commit_window_us: u64,
    /// A directory of static files served at `/` (the demo app: `demo-web/dist`).
    #[arg(long, value_name = "DIR")]
    demo_dir: Option<PathBuf>,
    /// glibc's malloc arenas (`M_ARENA_MAX`); 0 keeps glibc's default, 8 per core. Memory
    /// freed into one arena is reused only by allocations served from that arena, so every
    /// extra arena holds free memory of its own. With 2, 1,000 active documents took ~1 MB
    /// less RSS than with glibc's default, for ~5% less peak commit throughput; with 1, the
    /// fan-out's p99 rose (threads waiting on the one arena's lock). Ignored where the C library
    /// is not glibc.
    #[arg(long, env = "ACCORD_MALLOC_ARENAS", default_value_t = 2)]
    malloc_arenas: u32,
    /// The page cache of each of the store's SQLite connections, in KiB (default 512, a quarter
    /// of SQLite's): less saves memory (a fixed amount, up to this per connection), more helps a
    /// server that mostly writes large documents.
    #[arg(long, default_value_t = accord_server::storage::DEFAULT_PAGE_CACHE_KIB)]
    sqlite_cache_kib: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum RightsArg {
    Read,
    Write,
}

#[derive(Parser)]
struct TokenArgs {
    /// The document the token covers.
    #[arg(long, conflicts_with = "prefix", required_unless_present = "prefix")]
    doc: Option<accord_engine::DocumentId>,
    /// Cover every document whose id starts with this text ("" for all).
    #[arg(long)]
    prefix: Option<String>,
    /// What the token allows.
    #[arg(long, value_enum, default_value = "read")]
    rights: RightsArg,
    /// Seconds until it expires.
    #[arg(long, default_value_t = 3_600)]
    ttl_secs: u64,
    /// The signing secret.
    #[arg(long, env = "ACCORD_SECRET", hide_env_values = true)]
    secret: String,
}

/// The log filter when `RUST_LOG` is not set. Automerge instruments its hot functions with
/// info-level spans whose arguments (whole change lists) are formatted whenever the span is
/// enabled: 15% of the server's CPU with 8 automerge-repo typists, so its spans stay off.
const DEFAULT_LOG_FILTER: &str = "info,automerge=warn";

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Before any thread exists: a thread takes its arena at its first allocation.
    if let Command::Serve(args) = &cli.command {
        limit_malloc_arenas(args.malloc_arenas);
    }
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        // The server runs in a task, not in `block_on` itself: there its accept loop ran on the
        // main thread, outside the workers, so every new connection took two thread wake-ups
        // (the worker that saw the listener ready woke the main thread, whose spawn of the
        // connection woke a worker again). On a worker it accepts and spawns locally: a
        // WebSocket upgrade is answered in 0.20 ms instead of 0.30 (BENCHMARKS.md, session 21).
        Ok(runtime) => runtime.block_on(async {
            match tokio::spawn(run(cli)).await {
                Ok(code) => code,
                Err(error) => {
                    eprintln!("accord-server: the server task ended abnormally: {error}");
                    std::process::ExitCode::FAILURE
                }
            }
        }),
        Err(error) => {
            eprintln!("accord-server: cannot start the async runtime: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Caps glibc's malloc arenas at `arenas` (0: leaves glibc's default); see `Serve::malloc_arenas`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas(arenas: u32) {
    if arenas == 0 {
        return;
    }
    let arenas = libc::c_int::try_from(arenas).unwrap_or(libc::c_int::MAX);
    // SAFETY: `mallopt` sets one of glibc's allocator tunables and touches no memory of ours;
    // it is called before the runtime starts its threads. On failure it returns 0 and glibc
    // keeps its default, which is only a larger footprint, so the result is not checked.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

/// Caps glibc's malloc arenas: nothing to do where the C library is not glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas(_arenas: u32) {}

/// Runs the command the command line asked for.
async fn run(cli: Cli) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .init();
    match cli.command {
        Command::Token(args) => {
            let scope = match (args.doc, args.prefix) {
                (Some(doc), _) => Scope::Document(doc),
                (None, prefix) => Scope::Prefix(prefix.unwrap_or_default()),
            };
            let rights = match args.rights {
                RightsArg::Read => Rights::Read,
                RightsArg::Write => Rights::Write,
            };
            let claims = Claims {
                scope,
                rights,
                exp: unix_now().saturating_add(args.ttl_secs),
            };
            println!("{}", mint(args.secret.as_bytes(), &claims));
            std::process::ExitCode::SUCCESS
        }
        Command::AdminToken(args) => {
            println!("{}", admin_token(args.secret.as_bytes()));
            std::process::ExitCode::SUCCESS
        }
        Command::Serve(args) => match serve(args).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "accord-server failed");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

async fn serve(args: Serve) -> Result<(), Box<dyn std::error::Error>> {
    let auth = match (args.no_auth, args.secret) {
        (true, _) => AuthMode::Disabled,
        (false, Some(secret)) if !secret.is_empty() => AuthMode::Secret(secret.into_bytes()),
        (false, _) => {
            return Err("set ACCORD_SECRET (or --secret), or pass --no-auth explicitly".into())
        }
    };
    let mut config = Config::new(args.data_dir, auth);
    config.max_frame_bytes = args.max_frame_bytes;
    config.max_message_bytes = args.max_message_bytes;
    config.max_documents_per_connection = args.max_documents_per_connection;
    config.max_connections = args.max_connections;
    config.outbound_queue = args.outbound_queue;
    config.idle_timeout = Duration::from_secs(args.idle_timeout_secs.max(1));
    config.idle_evict = Duration::from_secs(args.idle_evict_secs);
    config.compact_every = args.compact_every.max(1);
    config.storage.commit_window = Duration::from_micros(args.commit_window_us);
    config.storage.page_cache_kib = args.sqlite_cache_kib;
    config.max_rest_body_bytes = args.max_rest_body_bytes.max(1);
    config.max_rest_in_flight = args.max_rest_in_flight.max(1);
    config.admin_token = args
        .admin_token
        .filter(|token| !token.is_empty())
        .map(AdminToken);
    for path in &args.schemas {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read schema {}: {e}", path.display()))?;
        let schema = accord_engine::invariant::Schema::from_json(&text)
            .map_err(|e| format!("schema {}: {e}", path.display()))?;
        tracing::info!(document_type = %schema.document_type, rules = schema.invariants.len(), "invariants loaded");
        config.schemas.push(schema);
    }
    config.reconcile_interval = Duration::from_millis(args.reconcile_interval_ms.max(10));
    config.automerge_sync_interval = Duration::from_millis(args.automerge_sync_interval_ms);
    if let Some(dir) = &args.demo_dir {
        tracing::info!(dir = %dir.display(), "serving the demo at /");
    }
    config.demo_dir = args.demo_dir;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    accord_server::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}
