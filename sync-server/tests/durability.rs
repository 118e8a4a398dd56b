//! Durability: the real `accord-server` binary is killed with SIGKILL while clients write; after
//! a restart on the same data directory every change that was acknowledged is there.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use accord_engine::storage::MemoryStorage;
use accord_engine::{ChangeId, DocKind, Document, DocumentId, Op, Path, ReplicaId};
use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Kills the child on drop, so a failing test leaves no server behind.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn spawn_server(data_dir: &FsPath, port: u16) -> Process {
    let child = Command::new(env!("CARGO_BIN_EXE_accord-server"))
        .args(["serve", "--no-auth", "--compact-every", "40", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && http(addr, "GET", "/healthz", None, None).await.status == 200
        {
            return process;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every commit of `document` in the change feed, by sequence number.
async fn feed(addr: SocketAddr, document: DocumentId) -> BTreeMap<u64, ChangeId> {
    let mut out = BTreeMap::new();
    loop {
        let since = out.keys().next_back().copied().unwrap_or(0);
        let path = format!("/v1/documents/{document}/changes?since={since}&limit=10000");
        let response = http(addr, "GET", &path, None, None).await;
        assert_eq!(response.status, 200, "{}", response.body);
        let lines = feed_lines(&response.body);
        if lines.is_empty() {
            return out;
        }
        for line in lines {
            let seq = line["seq"].as_u64().unwrap();
            let change = ChangeId::from_hex(line["change"].as_str().unwrap()).unwrap();
            assert!(out.insert(seq, change).is_none());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_sigkill() {
    const WRITERS: u8 = 4;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut server = spawn_server(dir.path(), port).await;
    let documents = [
        (DocumentId::from_bytes([1; 16]), DocKind::Automerge),
        (DocumentId::from_bytes([2; 16]), DocKind::Yrs),
    ];
    let killed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for n in 0..WRITERS {
        let (document, kind) = documents[usize::from(n % 2)];
        let killed = killed.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::new(MemoryStorage::new(), n + 1, replica_config(1 << 20));
            client.replica.create(document, kind).unwrap();
            client.connect(addr, None).await;
            client.subscribe(document).await;
            assert!(client.pump_until(WAIT, |c| c.is_subscribed(document)).await);
            let mut i = 0u64;
            // Write until the server is gone (or a bound, so a broken kill cannot hang the test).
            while !client.closed && i < 100_000 {
                let key = format!("w{n}-{i}");
                let path = match kind {
                    DocKind::Automerge => Path::keys([key]),
                    DocKind::Yrs => Path::keys(["m".to_string(), key]),
                };
                let ops = vec![Op::Put {
                    path,
                    value: json!(i),
                }];
                client.replica.change(document, &ops).unwrap();
                client.pump_for(Duration::from_millis(2)).await;
                i += 1;
                if killed.load(Ordering::SeqCst) {
                    // Read what is still in flight until the socket reports the close.
                    client.pump_for(Duration::from_millis(200)).await;
                    break;
                }
            }
            (document, i, client.acks.clone())
        }));
    }
    // Let them write, then kill the server mid-stream.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.0.kill().unwrap();
    let status = server.0.wait().unwrap();
    killed.store(true, Ordering::SeqCst);
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL");
    }
    let mut acknowledged: BTreeMap<DocumentId, BTreeMap<u64, ChangeId>> = BTreeMap::new();
    let mut written = 0;
    for task in tasks {
        let (document, count, acks) = task.await.unwrap();
        written += count;
        let seen = acknowledged.entry(document).or_default();
        for (seq, change) in acks {
            let previous = seen.insert(seq, change);
            assert!(
                previous.is_none_or(|p| p == change),
                "seq {seq} acked twice"
            );
        }
    }
    let total: usize = acknowledged.values().map(BTreeMap::len).sum();
    eprintln!("{written} changes written, {total} acknowledged before the kill");
    assert!(
        total >= 20,
        "too few acknowledged changes to mean anything: {total}"
    );
    assert!(
        (total as u64) <= written,
        "acks ({total}) cannot outnumber writes ({written})"
    );

    // Restart on the same data directory: every acknowledged change is there.
    drop(server);
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let server = spawn_server(dir.path(), port).await;
    for (document, kind) in documents {
        let acked = &acknowledged[&document];
        let stored = feed(addr, document).await;
        let head = stored.keys().next_back().copied().unwrap_or(0);
        assert_eq!(
            stored.keys().copied().collect::<Vec<_>>(),
            (1..=head).collect::<Vec<_>>(),
            "{kind}: the commit log is gapless"
        );
        let missing: Vec<_> = acked
            .iter()
            .filter(|(seq, change)| stored.get(seq) != Some(change))
            .collect();
        assert!(
            missing.is_empty(),
            "{kind}: {} of {} acknowledged changes lost or changed: {missing:?}",
            missing.len(),
            acked.len()
        );
        assert!(stored.len() >= acked.len());
        // A fresh client gets the same history: its catch-up ends at the same head.
        let read = http(
            addr,
            "GET",
            &format!("/v1/documents/{document}"),
            None,
            None,
        )
        .await;
        assert_eq!(read.json()["head_seq"], head, "{kind}");
        let mut fresh = Client::new(MemoryStorage::new(), 50, replica_config(1 << 20));
        fresh.replica.create(document, kind).unwrap();
        fresh.connect(addr, None).await;
        fresh.subscribe(document).await;
        let state = read.json()["state"].clone();
        assert!(
            fresh
                .pump_until(WAIT, |c| c.replica.json(document).unwrap() == state)
                .await,
            "{kind}: a fresh client catches up to the stored state"
        );
    }
    drop(server);
}

/// A data directory an older server wrote (schema 1: each document's snapshot inside its
/// `documents` row) is upgraded when the new binary starts on it: its documents read back as
/// they were, take new changes, and keep both across another restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_data_directory_is_upgraded_when_the_server_starts() {
    let dir = tempfile::tempdir().unwrap();
    let id = DocumentId::from_bytes([3; 16]);
    let author = ReplicaId::from_bytes([4; 16]);
    let mut doc = Document::new(DocKind::Yrs, author, id);
    let before = vec![Op::Put {
        path: Path::keys(["m", "title"]),
        value: json!("written before the upgrade"),
    }];
    let change = doc.apply_ops(&before).unwrap().unwrap();
    let snapshot = doc.save();
    {
        // As a schema-1 server left it after compacting: a snapshot covering commit 1, whose
        // bytes the log no longer holds.
        let db = rusqlite::Connection::open(dir.path().join("accord.db")).unwrap();
        db.execute_batch(accord_server::store::SCHEMA_1).unwrap();
        db.execute(
            "INSERT INTO documents VALUES (?1, 2, ?2, 1, 1)",
            rusqlite::params![id.as_bytes().as_slice(), snapshot],
        )
        .unwrap();
        db.execute(
            "INSERT INTO commits VALUES (?1, 1, ?2, ?3, NULL)",
            rusqlite::params![
                id.as_bytes().as_slice(),
                change.id.0.as_slice(),
                author.as_bytes().as_slice()
            ],
        )
        .unwrap();
    }
    let read = |addr| async move {
        let response = http(addr, "GET", &format!("/v1/documents/{id}"), None, None).await;
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()
    };
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let server = spawn_server(dir.path(), port).await;
    let upgraded = read(addr).await;
    assert_eq!(upgraded["head_seq"], 1);
    assert_eq!(
        upgraded["state"]["m"]["title"],
        "written before the upgrade"
    );
    let ops = json!([{"op": "put", "path": ["m", "after"], "value": true}]).to_string();
    let path = format!("/v1/documents/{id}/changes");
    let applied = http(addr, "POST", &path, None, Some(ops.as_bytes())).await;
    assert_eq!(applied.status, 200, "{}", applied.body);
    assert_eq!(applied.json()["seq"], 2);
    drop(server);
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let server = spawn_server(dir.path(), port).await;
    let reread = read(addr).await;
    assert_eq!(reread["head_seq"], 2);
    assert_eq!(reread["state"]["m"]["title"], "written before the upgrade");
    assert_eq!(reread["state"]["m"]["after"], true);
    drop(server);
}
