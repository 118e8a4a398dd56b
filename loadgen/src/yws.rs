//! Yjs workloads over the y-websocket protocol, the same bytes against every server: Accord's
//! `/yjs/{room}`, y-sweet's `/d/{room}/ws/{room}`, `@y/websocket-server`'s `/{room}`, and
//! Hocuspocus (whose frames carry the document name first and which wants an auth message
//! before anything else: `--proto hocuspocus`).
//!
//! - `yws-fanout`: one room, `--subscribers` readers and `--fanout-writers` writers; the writers'
//!   total rate steps through `--rates`; each step reports the updates delivered per second at
//!   the subscribers and the writer-to-subscriber latency. The best step is the highest delivered
//!   rate with p99 ≤ `--p99-ms` and (almost) nothing lost.
//! - `yws-docs`: `--docs` rooms × `--clients-per-doc` clients each typing one character every
//!   `--type-interval-ms`: server RSS per active room and CPU.
//! - `yws-idle`: `--connections` connections that finish the sync handshake and stay idle:
//!   server RSS per connection.
//!
//! Server RSS and CPU come from `/proc/{--server-pid}`. A frame is `varUint type` + payload
//! (0 sync: `varUint subtype` + `varUint8Array`); see ../shared/design/PEERS.md.

use accord_engine::protocol::put_varint;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, Map, Options, Text, Transact};

use crate::conn::Result;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    /// y-websocket framing (Accord /yjs, y-sweet, @y/websocket-server).
    Yws,
    /// Hocuspocus framing: varString document name before every message, auth first.
    Hocuspocus,
}

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    /// URL; `{room}` is replaced by the room name.
    pub template: String,
    pub proto: Proto,
    pub server_pid: Option<u32>,
}

const HANDSHAKE: Duration = Duration::from_secs(20);

/// Reads an unsigned LEB128 varint at `*pos` and moves past it.
pub(crate) fn read_var_uint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut n = 0u64;
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos)?;
        *pos += 1;
        n |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(n);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

impl Target {
    fn url(&self, room: &str) -> String {
        self.template.replace("{room}", room)
    }

    /// A sync frame `[0, subtype, varUint8Array(payload)]`, prefixed for Hocuspocus.
    fn sync_frame(&self, room: &str, subtype: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + room.len() + 8);
        if self.proto == Proto::Hocuspocus {
            put_varint(&mut out, room.len() as u64);
            out.extend_from_slice(room.as_bytes());
        }
        out.push(0);
        put_varint(&mut out, subtype);
        put_varint(&mut out, payload.len() as u64);
        out.extend_from_slice(payload);
        out
    }

    /// `(subtype, payload)` of a sync frame; `None` for anything else.
    fn parse<'a>(&self, frame: &'a [u8]) -> Option<(u64, &'a [u8])> {
        let mut pos = 0;
        if self.proto == Proto::Hocuspocus {
            let len = read_var_uint(frame, &mut pos)? as usize;
            pos += len;
        }
        let kind = read_var_uint(frame, &mut pos)?;
        if kind != 0 {
            return None;
        }
        let subtype = read_var_uint(frame, &mut pos)?;
        let len = read_var_uint(frame, &mut pos)? as usize;
        frame.get(pos..pos + len).map(|p| (subtype, p))
    }

    /// Connects to `room` and completes the sync handshake: sends step 1 with `state_vector`,
    /// answers the server's step 1 with an empty step 2, returns once step 2 arrived (its
    /// payload is returned).
    async fn open(&self, room: &str, state_vector: &[u8]) -> Result<(Ws, Vec<u8>)> {
        let url = self.url(room);
        // TCP_NODELAY, as browsers and Node's `ws` set on every WebSocket: without it a
        // writer's second small update waits for the server's delayed ACK (up to 40 ms).
        let (mut ws, _) = timeout(
            HANDSHAKE,
            tokio_tungstenite::connect_async_with_config(
                url.as_str(),
                Some(crate::conn::ws_config()),
                true,
            ),
        )
        .await
        .map_err(|_| format!("connect to {url} timed out"))?
        .map_err(|e| format!("connect to {url}: {e}"))?;
        if self.proto == Proto::Hocuspocus {
            // [name, Auth, Token, varString token]: the provider sends it even without a token.
            let mut auth = Vec::new();
            put_varint(&mut auth, room.len() as u64);
            auth.extend_from_slice(room.as_bytes());
            auth.extend_from_slice(&[2, 0, 0]);
            send(&mut ws, auth).await?;
        }
        send(&mut ws, self.sync_frame(room, 0, state_vector)).await?;
        let step2 = timeout(HANDSHAKE, async {
            loop {
                match ws.next().await {
                    Some(Ok(WsMessage::Binary(bytes))) => match self.parse(&bytes) {
                        Some((0, _)) => {
                            let empty = self.sync_frame(room, 1, &[0, 0]);
                            send(&mut ws, empty).await?;
                        }
                        Some((1, payload)) => return Ok(payload.to_vec()),
                        _ => {}
                    },
                    Some(Ok(WsMessage::Close(f))) => return Err(format!("closed: {f:?}")),
                    None => return Err("closed".to_string()),
                    Some(Err(e)) => return Err(format!("receive: {e}")),
                    Some(Ok(_)) => {}
                }
            }
        })
        .await
        .map_err(|_| format!("{url}: no sync step 2 within {HANDSHAKE:?}"))??;
        Ok((ws, step2))
    }
}

async fn send(ws: &mut Ws, frame: Vec<u8>) -> Result<()> {
    ws.send(WsMessage::Binary(frame.into()))
        .await
        .map_err(|e| format!("send: {e}"))
}

/// CPU seconds (user + system) and RSS in bytes of a process.
pub fn proc_usage(pid: Option<u32>) -> Option<(f64, u64)> {
    let pid = pid?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3; utime 14 and stime 15 (1-based) → index 11, 12.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks / 100.0, rss_kb * 1024))
}

/// The `p`th percentile of sorted microseconds, in milliseconds (NaN when empty).
pub(crate) fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("b{:x}", nanos & 0xffff_ffff_ffff)
}

// ---------------------------------------------------------------- fan-out

/// Send times of one step: writer slot × clock (each generated change is one map set, one clock).
struct Log {
    epoch: Instant,
    clients: HashMap<u64, usize>,
    sent_at: Vec<Vec<AtomicU64>>,
}

impl Log {
    /// Calls `f(slot, clock)` for every change an update carries. A single-struct update is
    /// read from its header; merged updates (a server that coalesces) are decoded and every
    /// clock range they insert is counted (each generated change inserts one clock). (Not the
    /// update's `state_vector()`: yrs gives an upper bound there only for a client whose blocks
    /// start at clock 0, so a merge of later changes would count nothing.)
    fn changes(&self, update: &[u8], mut f: impl FnMut(usize, u32)) {
        let mut pos = 0;
        let header = (|| {
            let clients = read_var_uint(update, &mut pos)?;
            let structs = read_var_uint(update, &mut pos)?;
            let client = read_var_uint(update, &mut pos)?;
            let clock = read_var_uint(update, &mut pos)?;
            Some((clients, structs, client, clock))
        })();
        if let Some((1, 1, client, clock)) = header {
            if let Some(&slot) = self.clients.get(&client) {
                f(slot, clock as u32);
            }
            return;
        }
        let Ok(update) = yrs::Update::decode_v1(update) else {
            return;
        };
        for (client, ranges) in update.insertions(true).iter() {
            let Some(&slot) = self.clients.get(&client.get()) else {
                continue;
            };
            for range in ranges.iter() {
                for clock in range.clone() {
                    f(slot, clock);
                }
            }
        }
    }
}

pub struct FanoutStep {
    pub rate: f64,
    pub sent: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: usize,
    pub per_sec: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub cpu: f64,
    pub rss_mb: f64,
    /// CPU of the load generator itself (cores): near 2 on 2 cores means it is the limit.
    pub own_cpu: f64,
    /// Frames carrying updates that reached the subscribers (fewer than `delivered` when the
    /// server coalesces).
    pub frames: u64,
}

impl FanoutStep {
    pub fn ok(&self, p99_ms: f64) -> bool {
        self.lost == 0 && self.p99 <= p99_ms && self.delivered as f64 >= 0.99 * self.expected as f64
    }
}

fn fanout_changes(client: u64, count: usize) -> Vec<Vec<u8>> {
    let doc = Doc::with_options(Options {
        client_id: yrs::block::ClientID::new(client),
        ..Options::default()
    });
    let map = doc.get_or_insert_map("m");
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let mut txn = doc.transact_mut();
        map.insert(&mut txn, format!("k{}", i % 16), i as i64);
        out.push(txn.encode_update_v1());
    }
    out
}

/// One room's clients, opened the first one first: each client takes a [`Turn`], waits for it,
/// opens, and says so. y-sweet 0.9.1 loads a document for every connection that finds it not
/// loaded yet, so clients that join a new room at the same moment can land on two copies of it
/// that never hear from each other (its log says "Loading doc" twice for the room: 4.5–5.6% of
/// the `docs` load's rooms, and fan-out rooms whose subscribers then missed a fifth of the
/// updates). With one client in first, every server holds one copy and is measured at what it
/// does, not at that race.
struct FirstIn {
    first: Option<tokio::sync::watch::Sender<bool>>,
    open: tokio::sync::watch::Receiver<bool>,
}

impl FirstIn {
    fn new() -> Self {
        let (first, open) = tokio::sync::watch::channel(false);
        Self {
            first: Some(first),
            open,
        }
    }

    /// The next client's turn; the first call's is the first client's.
    fn turn(&mut self) -> Turn {
        Turn {
            first: self.first.take(),
            open: self.open.clone(),
        }
    }
}

/// One client's place in its room's [`FirstIn`].
struct Turn {
    /// Set for the room's first client, which lets the others go.
    first: Option<tokio::sync::watch::Sender<bool>>,
    open: tokio::sync::watch::Receiver<bool>,
}

impl Turn {
    /// Waits until the room's first client tried to open, unless this is that client.
    async fn wait(&mut self) {
        if self.first.is_none() {
            // An error means the first client's turn ended without opening: go on regardless.
            let _ = self.open.wait_for(|open| *open).await;
        }
    }

    /// This client tried to open: if it was the first, the others may go. (A first turn
    /// dropped without this lets them go too.)
    fn opened(self) {
        if let Some(first) = self.first {
            let _ = first.send(true);
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn fanout_step(
    target: &Target,
    subscribers: usize,
    writers: usize,
    rate: f64,
    duration: f64,
    step: usize,
) -> Result<FanoutStep> {
    let room = format!("{}-fan{step}", run_tag());
    let per_writer = ((rate * duration) / writers as f64).ceil() as usize + 1;
    let base_client = 0x1000_0000u64 + (std::process::id() as u64) * 64 + step as u64 * 1024;
    let mut batches = Vec::new();
    let mut clients = HashMap::new();
    for w in 0..writers {
        let client = (base_client + w as u64) & 0xffff_ffff;
        clients.insert(client, w);
        batches.push(fanout_changes(client, per_writer));
    }
    let log = Arc::new(Log {
        epoch: Instant::now(),
        clients,
        sent_at: (0..writers)
            .map(|_| (0..per_writer).map(|_| AtomicU64::new(0)).collect())
            .collect(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let delivered = Arc::new(AtomicU64::new(0));
    let frames = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(Barrier::new(subscribers + 1));
    let hard = Instant::now() + Duration::from_secs_f64(duration) + Duration::from_secs(60);
    let mut subs = Vec::new();
    let mut first_in = FirstIn::new();
    for _ in 0..subscribers {
        let (target, room, log, mut stop, delivered, frames, ready, mut turn) = (
            target.clone(),
            room.clone(),
            log.clone(),
            stop_rx.clone(),
            delivered.clone(),
            frames.clone(),
            ready.clone(),
            first_in.turn(),
        );
        subs.push(tokio::spawn(async move {
            turn.wait().await;
            let opened = target.open(&room, &[0]).await;
            turn.opened();
            ready.wait().await;
            let (ws, _) = opened?;
            let (_sink, mut stream) = ws.split();
            let mut micros: Vec<u32> = Vec::new();
            // Each change counts once per subscriber, however often or merged it arrives.
            let mut seen: Vec<Vec<bool>> =
                log.sent_at.iter().map(|w| vec![false; w.len()]).collect();
            let mut lost = false;
            // One pinned stop future (no timer armed per frame: the generator must stay cheap).
            let stopped = async {
                let _ = stop.wait_for(|s| *s).await;
            };
            let deadline = tokio::time::sleep_until(hard);
            tokio::pin!(stopped, deadline);
            loop {
                let frame = tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    _ = &mut deadline => break,
                    next = stream.next() => match next {
                        Some(Ok(WsMessage::Binary(b))) => b,
                        Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => {
                            lost = true;
                            break;
                        }
                        Some(Ok(_)) => continue,
                    },
                };
                if let Some((1 | 2, update)) = target.parse(&frame) {
                    let now = log.epoch.elapsed().as_nanos() as u64;
                    let mut n = 0;
                    log.changes(update, |slot, clock| {
                        let clock = clock as usize;
                        if let Some(sent) = log.sent_at[slot].get(clock) {
                            let sent = sent.load(Ordering::Relaxed);
                            if sent > 0 && !std::mem::replace(&mut seen[slot][clock], true) {
                                micros.push((now.saturating_sub(sent) / 1000) as u32);
                                n += 1;
                            }
                        }
                    });
                    delivered.fetch_add(n, Ordering::Relaxed);
                    if n > 0 {
                        frames.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok::<_, String>((micros, lost))
        }));
    }
    ready.wait().await;
    // Writers connect after the subscribers.
    let mut socks = Vec::new();
    for _ in 0..writers {
        let (ws, _) = target.open(&room, &[0]).await?;
        let (sink, stream) = ws.split();
        socks.push((sink, stream));
    }
    let usage0 = proc_usage(target.server_pid);
    let own0 = proc_usage(Some(std::process::id()));
    let begun = Instant::now();
    let until = Duration::from_secs_f64(duration);
    let per_writer_rate = rate / writers as f64;
    let mut tasks = Vec::new();
    for (w, ((sink, stream), changes)) in socks.into_iter().zip(batches).enumerate() {
        let (target, room, log, stop) = (target.clone(), room.clone(), log.clone(), stop.clone());
        tasks.push(tokio::spawn(writer_task(
            target,
            room,
            log,
            stop,
            w,
            sink,
            stream,
            changes,
            per_writer_rate,
            begun,
            until,
        )));
    }
    let mut sent = 0u64;
    for t in tasks {
        sent += t.await.map_err(|e| e.to_string())?? as u64;
    }
    let expected = sent * subscribers as u64;
    let drain = Instant::now() + Duration::from_secs(10);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = begun.elapsed().as_secs_f64();
    let usage1 = proc_usage(target.server_pid);
    let own1 = proc_usage(Some(std::process::id()));
    stop.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let mut all = Vec::new();
    let mut lost = 0;
    for s in subs {
        match s.await.map_err(|e| e.to_string())? {
            Ok((micros, l)) => {
                all.extend(micros);
                lost += usize::from(l);
            }
            Err(e) => {
                eprintln!("subscriber: {e}");
                lost += 1;
            }
        }
    }
    all.sort_unstable();
    let total = all.len() as u64;
    let (cpu, rss_mb) = match (usage0, usage1) {
        (Some(a), Some(b)) => ((b.0 - a.0) / elapsed, b.1 as f64 / 1e6),
        _ => (f64::NAN, f64::NAN),
    };
    Ok(FanoutStep {
        rate,
        sent,
        expected,
        delivered: total,
        lost,
        per_sec: total as f64 / elapsed,
        p50: percentile_ms(&all, 50.0),
        p99: percentile_ms(&all, 99.0),
        max: percentile_ms(&all, 100.0),
        cpu,
        rss_mb,
        own_cpu: match (own0, own1) {
            (Some(a), Some(b)) => (b.0 - a.0) / elapsed,
            _ => f64::NAN,
        },
        frames: frames.load(Ordering::Relaxed),
    })
}

#[allow(clippy::too_many_arguments)]
async fn writer_task(
    target: Target,
    room: String,
    log: Arc<Log>,
    stop: Arc<AtomicBool>,
    slot: usize,
    mut sink: SplitSink<Ws, WsMessage>,
    stream: SplitStream<Ws>,
    changes: Vec<Vec<u8>>,
    rate: f64,
    begun: Instant,
    until: Duration,
) -> Result<usize> {
    // Drain what the server relays to the writer (other writers' updates).
    let drain_stop = stop.clone();
    let drainer = tokio::spawn(async move {
        let mut stream = stream;
        while !drain_stop.load(Ordering::Relaxed) {
            match timeout(Duration::from_millis(50), stream.next()).await {
                Ok(Some(Ok(_))) | Err(_) => {}
                _ => break,
            }
        }
    });
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next = 0usize;
    loop {
        ticker.tick().await;
        let elapsed = begun.elapsed();
        if elapsed >= until || next >= changes.len() {
            break;
        }
        let due = ((elapsed.as_secs_f64() * rate).floor() as usize + 1).min(changes.len());
        let mut fed = false;
        while next < due {
            let at = log.epoch.elapsed().as_nanos() as u64;
            log.sent_at[slot][next].store(at.max(1), Ordering::Relaxed);
            let frame = target.sync_frame(&room, 2, &changes[next]);
            sink.feed(WsMessage::Binary(frame.into()))
                .await
                .map_err(|e| format!("writer send: {e}"))?;
            next += 1;
            fed = true;
        }
        if fed {
            sink.flush()
                .await
                .map_err(|e| format!("writer flush: {e}"))?;
        }
    }
    // Keep the connection open (the drainer reads) until the step ends.
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = sink.close().await;
        drainer.abort();
    });
    Ok(next)
}

// ---------------------------------------------------------------- idle connections

pub struct IdleResult {
    pub connections: usize,
    pub rss_before: u64,
    pub rss_after: u64,
    pub connect_secs: f64,
}

pub async fn idle(
    target: &Target,
    connections: usize,
    rooms: usize,
    hold: f64,
) -> Result<IdleResult> {
    let tag = run_tag();
    let before = proc_usage(target.server_pid).map(|u| u.1).unwrap_or(0);
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(128));
    let mut tasks = Vec::with_capacity(connections);
    for i in 0..connections {
        let (target, sem) = (target.clone(), sem.clone());
        let room = format!("{tag}-idle{}", i % rooms.max(1));
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
            target.open(&room, &[0]).await.map(|(ws, _)| ws)
        }));
    }
    let mut held = Vec::with_capacity(connections);
    let mut failed = 0;
    for t in tasks {
        match t.await.map_err(|e| e.to_string())? {
            Ok(ws) => held.push(ws),
            Err(e) => {
                if failed < 3 {
                    eprintln!("idle: {e}");
                }
                failed += 1;
            }
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "idle: {} connected ({failed} failed) in {connect_secs:.1}s; holding {hold}s",
        held.len()
    );
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let after = proc_usage(target.server_pid).map(|u| u.1).unwrap_or(0);
    let n = held.len();
    // Close in the background-free way: drop (the server sees resets).
    drop(held);
    if failed > 0 {
        return Err(format!(
            "idle: {failed} of {connections} connections failed"
        ));
    }
    Ok(IdleResult {
        connections: n,
        rss_before: before,
        rss_after: after,
        connect_secs,
    })
}

// ---------------------------------------------------------------- many documents

/// One batch of the `docs` load: its rooms' clients connected and typing (and every earlier
/// batch's still typing) for `duration`.
pub struct DocsBatch {
    /// Server RSS just before this batch's clients connected.
    pub rss_before: u64,
    /// Server RSS after this batch had typed for `duration`.
    pub rss_after: u64,
    /// Server CPU (cores) while this batch typed.
    pub cpu_cores: f64,
}

/// What the `docs` load measured.
pub struct DocsResult {
    /// Rooms per batch.
    pub docs: usize,
    /// Clients per batch.
    pub clients: usize,
    /// Each batch, in the order they joined.
    pub batches: Vec<DocsBatch>,
    /// Keystrokes sent by every client of every batch.
    pub typed: u64,
    /// Binary frames received by every client of every batch.
    pub received: u64,
}

/// `batches` batches of `docs` rooms × `per_doc` clients, one after the other; each batch
/// types for `duration` seconds while every earlier batch keeps typing, so the RSS a later
/// batch adds is the cost of one more active room, without the server's fixed costs (code
/// paged in, caches filling up to their ceiling) that the first batch also pays.
pub async fn docs(
    target: &Target,
    docs: usize,
    per_doc: usize,
    interval_ms: u64,
    duration: f64,
    batches: usize,
) -> Result<DocsResult> {
    let tag = run_tag();
    let batches = batches.max(1);
    let typed = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    // Set when the last batch starts typing: every client stops then.
    let (end_tx, end_rx) = tokio::sync::watch::channel(None::<Instant>);
    let mut tasks = Vec::new();
    let mut results = Vec::new();
    let mut rss = proc_usage(target.server_pid).map(|u| u.1).unwrap_or(0);
    for batch in 0..batches {
        let rss_before = rss;
        let sem = Arc::new(tokio::sync::Semaphore::new(128));
        let ready = Arc::new(Barrier::new(docs * per_doc + 1));
        let (start_tx, start_rx) = tokio::sync::watch::channel(None::<Instant>);
        let first_task = tasks.len();
        for d in 0..docs {
            let mut first_in = FirstIn::new();
            for c in 0..per_doc {
                let (target, sem, ready, typed, received, mut start_rx, end_rx, mut turn) = (
                    target.clone(),
                    sem.clone(),
                    ready.clone(),
                    typed.clone(),
                    received.clone(),
                    start_rx.clone(),
                    end_rx.clone(),
                    first_in.turn(),
                );
                let room = format!("{tag}-b{batch}-doc{d}");
                let client = 0x2000_0000u64 + ((batch * docs + d) * per_doc + c) as u64;
                tasks.push(tokio::spawn(async move {
                    // Before the permit: no permit is held by a client waiting for another.
                    turn.wait().await;
                    let opened = {
                        let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
                        // A server may refuse a client while it creates the room (y-sweet has
                        // answered 500): retry a little.
                        let mut attempt = 0;
                        loop {
                            match target.open(&room, &[0]).await {
                                Err(_) if attempt < 5 => {
                                    attempt += 1;
                                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                                }
                                other => break other,
                            }
                        }
                    };
                    turn.opened();
                    ready.wait().await;
                    let (ws, _) = opened?;
                    let begun = start_rx
                        .wait_for(|s| s.is_some())
                        .await
                        .map_err(|e| e.to_string())?
                        .ok_or("no start")?;
                    let (mut sink, mut stream) = ws.split();
                    let doc = Doc::with_options(Options {
                        client_id: yrs::block::ClientID::new(client),
                        ..Options::default()
                    });
                    let text = doc.get_or_insert_text("t");
                    // Spread the first keystroke over the interval.
                    let phase = Duration::from_millis((client * 7919) % interval_ms.max(1));
                    let mut next = begun + phase;
                    loop {
                        let end = *end_rx.borrow();
                        let wake = end.map_or(next, |end| next.min(end));
                        match timeout_at(wake, stream.next()).await {
                            Ok(Some(Ok(WsMessage::Binary(_)))) => {
                                received.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Ok(Some(Ok(_))) => continue,
                            Ok(_) => return Err("docs: connection closed".to_string()),
                            Err(_) => {}
                        }
                        if end.is_some_and(|end| Instant::now() >= end) {
                            break;
                        }
                        let update = {
                            let mut txn = doc.transact_mut();
                            let len = text.len(&txn);
                            text.insert(&mut txn, len, "x");
                            txn.encode_update_v1()
                        };
                        let _ = text.get_string(&doc.transact());
                        sink.send(WsMessage::Binary(
                            target.sync_frame(&room, 2, &update).into(),
                        ))
                        .await
                        .map_err(|e| format!("docs send: {e}"))?;
                        typed.fetch_add(1, Ordering::Relaxed);
                        next += Duration::from_millis(interval_ms);
                    }
                    Ok::<_, String>((sink, stream))
                }));
            }
        }
        // Wait for every client of the batch to connect, then time the typing.
        let connected = Instant::now();
        let waiter = ready.wait();
        tokio::pin!(waiter);
        loop {
            if timeout(Duration::from_millis(200), &mut waiter)
                .await
                .is_ok()
            {
                break;
            }
            if tasks[first_task..].iter().any(|t| t.is_finished()) {
                return Err("docs: a client failed to connect".into());
            }
            if connected.elapsed() > Duration::from_secs(120) {
                return Err("docs: connecting took over 120 s".into());
            }
        }
        eprintln!(
            "docs: batch {batch}: {} clients connected in {:.1}s",
            docs * per_doc,
            connected.elapsed().as_secs_f64()
        );
        let usage0 = proc_usage(target.server_pid);
        let begun = Instant::now();
        let end = begun + Duration::from_secs_f64(duration);
        let _ = start_tx.send(Some(begun));
        // The last batch ends every client's typing; an earlier one only times its own.
        let mut held = Vec::new();
        if batch + 1 == batches {
            let _ = end_tx.send(Some(end));
            for t in tasks.drain(..) {
                held.push(t.await.map_err(|e| e.to_string())??);
            }
        } else {
            tokio::time::sleep_until(end).await;
            if tasks.iter().any(|t| t.is_finished()) {
                return Err("docs: a client stopped early".into());
            }
        }
        let (elapsed, usage1) = (begun.elapsed().as_secs_f64(), proc_usage(target.server_pid));
        drop(held);
        let measured = batch_usage(rss_before, usage0, usage1, elapsed);
        rss = measured.rss_after;
        results.push(measured);
    }
    Ok(DocsResult {
        docs,
        clients: docs * per_doc,
        batches: results,
        typed: typed.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
    })
}

/// One batch's figures from the server's (CPU seconds, RSS) before and after its `elapsed`
/// seconds of typing (NaN CPU when the server's usage could not be read).
fn batch_usage(
    rss_before: u64,
    usage0: Option<(f64, u64)>,
    usage1: Option<(f64, u64)>,
    elapsed: f64,
) -> DocsBatch {
    DocsBatch {
        rss_before,
        rss_after: usage1.map(|u| u.1).unwrap_or(0),
        cpu_cores: match (usage0, usage1) {
            (Some(a), Some(b)) => (b.0 - a.0) / elapsed,
            _ => f64::NAN,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn later_clients_wait_for_the_first_and_go_once_it_is_open() {
        let mut room = FirstIn::new();
        let mut first = room.turn();
        tokio::time::timeout(Duration::from_secs(5), first.wait())
            .await
            .expect("the first client waits for nobody");
        let mut second = room.turn();
        let later = tokio::spawn(async move { second.wait().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !later.is_finished(),
            "a later client went before the first was open"
        );
        first.opened();
        tokio::time::timeout(Duration::from_secs(5), later)
            .await
            .expect("the first client's opening lets the others go")
            .expect("task");
    }

    #[tokio::test]
    async fn later_clients_go_on_when_the_first_gives_up() {
        let mut room = FirstIn::new();
        let first = room.turn();
        let mut second = room.turn();
        let later = tokio::spawn(async move { second.wait().await });
        // The first client's task ends without opening (an error, a panic): its turn drops.
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), later)
            .await
            .expect("a first client that gave up still lets the others go")
            .expect("task");
    }
}
