//! `am-typists`: N typists in one Automerge document over the automerge-repo network protocol
//! (CBOR `join`/`peer`/`sync` frames), the same bytes against Accord's `/automerge` and against
//! `@automerge/automerge-repo-sync-server`.
//!
//! Real automerge-repo clients (bench/node/typists.mjs) each hold the whole document and apply
//! every typist's every keystroke, so one process of them saturates two cores past about 16
//! typists: the load then measures the clients, not the server. These clients are thin, and
//! written by hand for that reason: each keeps only the change graph (hashes, heads, the
//! highest op counter), never the text. A keystroke is a real Automerge change built with the
//! `automerge` crate (`ExpandedChange` → `Change`): one character inserted after the typist's
//! previous one, its dependencies the typist's current heads (everything it has received, as a
//! real client's would be), its message the send time. A received change is parsed for its hash,
//! dependencies and send time only. After anything new arrives the client answers with its
//! heads, as automerge-repo does; it claims V1 messages only, so servers send changes one by
//! one and never a whole document.
//!
//! Reported: server CPU per typist over the typing window (from `/proc/{--server-pid}`), the
//! keystroke delivery latency to the other typists (p50/p99/max), the lag when typing stops
//! (the most characters any typist had not yet received) and whether every typist received
//! every keystroke within the catch-up bound.

use std::collections::HashSet;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use automerge::legacy::{ElementId, Key, ObjectId, Op, OpId, OpType, SortedVec};
use automerge::sync::{BloomFilter, Have, Message, MessageVersion};
use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ChangeHash, ExpandedChange, ObjType, ScalarValue, ROOT};
use ciborium::Value;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{watch, Barrier};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::conn::Result;
use crate::yws::{percentile_ms, proc_usage, read_var_uint};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a typist waits for the server's `peer` answer or first sync message.
const HANDSHAKE: Duration = Duration::from_secs(20);
/// How long after typing stops every keystroke may take to reach every typist.
const CATCH_UP: Duration = Duration::from_secs(30);

/// What one run measured.
pub struct TypistsResult {
    pub typists: usize,
    pub typed: u64,
    pub seconds: f64,
    pub server_cores: f64,
    pub server_rss: u64,
    pub loadgen_cores: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub lag_at_stop: u64,
    pub caught_up: bool,
    pub catch_up_s: f64,
}

/// The document every typist starts from: a text at `text`, made by a seed actor.
struct Seed {
    bytes: Vec<u8>,
    hash: ChangeHash,
    text: OpId,
}

fn seed() -> Result<Seed> {
    let mut doc = AutoCommit::new().with_actor(ActorId::from([0xAA; 16]));
    doc.put_object(ROOT, "text", ObjType::Text)
        .map_err(|e| e.to_string())?;
    let hash = doc.commit().ok_or("seed: no change")?;
    let change = doc.get_change_by_hash(&hash).ok_or("seed: no change")?;
    Ok(Seed {
        bytes: change.raw_bytes().to_vec(),
        hash,
        text: OpId(change.start_op().get(), change.actor_id().clone()),
    })
}

/// The fields of a change chunk a typist needs, read from its header without decoding its ops.
struct Parsed {
    hash: ChangeHash,
    deps: Vec<ChangeHash>,
    start_op: u64,
    sent_micros: Option<u64>,
}

/// An unsigned LEB128 varint at the start of `bytes`, which then start after it.
fn uleb(bytes: &mut &[u8]) -> Option<u64> {
    let mut pos = 0;
    let value = read_var_uint(bytes, &mut pos)?;
    *bytes = &bytes[pos..];
    Some(value)
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if bytes.len() < n {
        return None;
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Some(head)
}

/// Splits `bytes` into change chunks and reads each: the hash (SHA-256 of type, length and
/// body, as Automerge computes it), the dependencies, the start op and the message. A
/// compressed chunk is decoded by the `automerge` crate instead. `None` on anything else.
fn parse_changes(mut bytes: &[u8], out: &mut Vec<Parsed>) -> Option<()> {
    use sha2::Digest;
    while !bytes.is_empty() {
        let whole = bytes;
        let header = take(&mut bytes, 9)?;
        if header[..4] != [0x85, 0x6f, 0x4a, 0x83] {
            return None;
        }
        let kind = header[8];
        let length = usize::try_from(uleb(&mut bytes)?).ok()?;
        let mut body = take(&mut bytes, length)?;
        let chunk = &whole[..whole.len() - bytes.len()];
        if kind == 2 {
            let change = automerge::Change::try_from(chunk).ok()?;
            out.push(Parsed {
                hash: change.hash(),
                deps: change.deps().to_vec(),
                start_op: change.start_op().get(),
                sent_micros: change.message().and_then(|m| m.parse().ok()),
            });
            continue;
        }
        if kind != 1 {
            return None;
        }
        let hash = ChangeHash(sha2::Sha256::digest(&chunk[8..]).into());
        let count = uleb(&mut body)?;
        let mut deps = Vec::new();
        for _ in 0..count {
            deps.push(ChangeHash(take(&mut body, 32)?.try_into().ok()?));
        }
        let actor_len = usize::try_from(uleb(&mut body)?).ok()?;
        take(&mut body, actor_len)?;
        let _seq = uleb(&mut body)?;
        let start_op = uleb(&mut body)?;
        let _time = uleb(&mut body)?; // signed LEB128: only skipped
        let message_len = usize::try_from(uleb(&mut body)?).ok()?;
        let message = take(&mut body, message_len)?;
        let sent_micros = std::str::from_utf8(message).ok()?.parse().ok();
        out.push(Parsed {
            hash,
            deps,
            start_op,
            sent_micros,
        });
    }
    Some(())
}

/// Change hashes, hashed with foldhash (SipHash over 32 bytes per dependency was a cost here).
type Hashes = HashSet<ChangeHash, foldhash::fast::RandomState>;

/// One typist's view of the document: the change graph only.
struct Graph {
    actor: ActorId,
    known: Hashes,
    /// A set, sorted when sent: with many typists a change has dozens of dependencies and a
    /// typist dozens of heads (a list filtered per change was most of the load generator's
    /// CPU at 128 typists).
    heads: Hashes,
    max_op: u64,
    seq: u64,
    previous: Option<OpId>,
}

impl Graph {
    /// A typist writing as `actor` that has seen the seed.
    fn new(actor: ActorId, seed: &Seed) -> Self {
        let mut graph = Graph {
            actor,
            known: Hashes::default(),
            heads: Hashes::default(),
            max_op: 0,
            seq: 0,
            previous: None,
        };
        graph.add(seed.hash, &[], seed.text.0);
        graph
    }

    fn add(&mut self, hash: ChangeHash, deps: &[ChangeHash], max_op: u64) -> bool {
        if !self.known.insert(hash) {
            return false;
        }
        for dep in deps {
            self.heads.remove(dep);
        }
        self.heads.insert(hash);
        self.max_op = self.max_op.max(max_op);
        true
    }

    fn sorted_heads(&self) -> Vec<ChangeHash> {
        let mut heads: Vec<ChangeHash> = self.heads.iter().copied().collect();
        heads.sort_unstable();
        heads
    }

    /// A keystroke: one character after the previous one (the first at the start of the text).
    fn type_one(&mut self, text: &OpId, character: char) -> Result<Vec<u8>> {
        let start_op = self.max_op + 1;
        self.seq += 1;
        let key = match &self.previous {
            Some(id) => Key::Seq(ElementId::Id(id.clone())),
            None => Key::Seq(ElementId::Head),
        };
        let sent = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let expanded = ExpandedChange {
            operations: vec![Op {
                action: OpType::Put(ScalarValue::Str(character.to_string().into())),
                obj: ObjectId::Id(text.clone()),
                key,
                pred: SortedVec::new(),
                insert: true,
            }],
            actor_id: self.actor.clone(),
            hash: None,
            seq: self.seq,
            start_op: NonZeroU64::new(start_op).ok_or("op counter overflow")?,
            time: 0,
            message: Some(sent.to_string()),
            deps: self.sorted_heads(),
            extra_bytes: Vec::new(),
            author: None,
        };
        let change = automerge::Change::from(expanded);
        self.add(change.hash(), change.deps(), start_op);
        self.previous = Some(OpId(start_op, self.actor.clone()));
        Ok(change.raw_bytes().to_vec())
    }

    /// A V1 sync message with our heads ("we have everything up to them") and `changes`.
    fn message(&self, changes: Vec<Vec<u8>>) -> Vec<u8> {
        let heads = self.sorted_heads();
        Message {
            heads: heads.clone(),
            need: Vec::new(),
            have: vec![Have {
                last_sync: heads,
                bloom: BloomFilter::default(),
            }],
            changes: changes.into(),
            flags: None,
            version: MessageVersion::V1,
        }
        .encode()
    }
}

fn cbor(fields: Vec<(&str, Value)>) -> Result<Vec<u8>> {
    let map = Value::Map(
        fields
            .into_iter()
            .map(|(k, v)| (Value::Text(k.to_owned()), v))
            .collect(),
    );
    let mut out = Vec::new();
    ciborium::into_writer(&map, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

fn field<'a>(message: &'a Value, key: &str) -> Option<&'a Value> {
    message.as_map()?.iter().find_map(|(k, v)| match k {
        Value::Text(t) if t == key => Some(v),
        _ => None,
    })
}

/// The next message of type `kind` from the server (others are skipped), within [`HANDSHAKE`].
async fn next_of_type(ws: &mut Ws, kind: &str) -> Result<Value> {
    timeout(HANDSHAKE, async {
        while let Some(frame) = ws.next().await {
            if let Ok(WsMessage::Binary(bytes)) = frame {
                let message: Value =
                    ciborium::from_reader(&bytes[..]).map_err(|e| e.to_string())?;
                if field(&message, "type").and_then(Value::as_text) == Some(kind) {
                    return Ok(message);
                }
            }
        }
        Err(format!("closed before a {kind} message"))
    })
    .await
    .map_err(|_| format!("no {kind} message within {HANDSHAKE:?}"))?
}

/// Shared counters of one run.
struct Shared {
    /// Keystrokes typed by each typist.
    typed: Vec<AtomicU64>,
    /// Other typists' keystrokes each typist has received.
    received: Vec<AtomicU64>,
    /// Delivery latencies in microseconds (one per keystroke received: bounded by the run).
    latencies: Mutex<Vec<u32>>,
}

/// Runs `n` typists at `rate` keystrokes a second each for `seconds` against `url`.
pub async fn typists(
    url: &str,
    n: usize,
    rate: f64,
    seconds: f64,
    server_pid: Option<u32>,
) -> Result<TypistsResult> {
    if n < 2 || rate <= 0.0 {
        return Err("am-typists needs --typists of at least 2 and a positive --type-rate".into());
    }
    let seed = Arc::new(seed()?);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut id = [0u8; 16];
    id.copy_from_slice(&nanos.to_le_bytes()[..16]);
    id[0] ^= 0x5A;
    // A version 4 UUID, which automerge-repo requires of a document id.
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    let document = bs58::encode(id).with_check().into_string();
    let shared = Arc::new(Shared {
        typed: (0..n).map(|_| AtomicU64::new(0)).collect(),
        received: (0..n).map(|_| AtomicU64::new(0)).collect(),
        latencies: Mutex::new(Vec::new()),
    });
    let ready = Arc::new(Barrier::new(n + 1));
    let (start_tx, start_rx) = watch::channel(None::<(Instant, Instant)>);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..n {
        let (url, seed, document, shared, ready, start_rx, stop_rx) = (
            url.to_owned(),
            seed.clone(),
            document.clone(),
            shared.clone(),
            ready.clone(),
            start_rx.clone(),
            stop_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            typist(
                i, n, rate, &url, &seed, &document, &shared, &ready, start_rx, stop_rx,
            )
            .await
        }));
    }
    // Everyone connected and in sync with the seed: type.
    timeout(HANDSHAKE * 3, ready.wait())
        .await
        .map_err(|_| "am-typists: typists did not all connect")?;
    let usage0 = proc_usage(server_pid);
    let own0 = proc_usage(Some(std::process::id()));
    let begun = Instant::now();
    let end = begun + Duration::from_secs_f64(seconds);
    let _ = start_tx.send(Some((begun, end)));
    tokio::time::sleep_until(end).await;
    let elapsed = begun.elapsed().as_secs_f64();
    let usage1 = proc_usage(server_pid);
    let own1 = proc_usage(Some(std::process::id()));
    // Keystrokes still in flight at the stop: wait for them (bounded).
    let typed: Vec<u64> = shared
        .typed
        .iter()
        .map(|t| t.load(Ordering::Relaxed))
        .collect();
    let total: u64 = typed.iter().sum();
    let missing = |shared: &Shared| -> u64 {
        (0..n)
            .map(|i| (total - typed[i]).saturating_sub(shared.received[i].load(Ordering::Relaxed)))
            .max()
            .unwrap_or(0)
    };
    let lag_at_stop = missing(&shared);
    let stopped = Instant::now();
    let mut caught_up = lag_at_stop == 0;
    while !caught_up && stopped.elapsed() < CATCH_UP {
        tokio::time::sleep(Duration::from_millis(20)).await;
        caught_up = missing(&shared) == 0;
        if tasks.iter().any(|t| t.is_finished()) {
            break;
        }
    }
    let catch_up_s = stopped.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let mut latencies = std::mem::take(&mut *shared.latencies.lock().map_err(|e| e.to_string())?);
    latencies.sort_unstable();
    let cores = |a: Option<(f64, u64)>, b: Option<(f64, u64)>| match (a, b) {
        (Some(a), Some(b)) => (b.0 - a.0) / elapsed,
        _ => f64::NAN,
    };
    Ok(TypistsResult {
        typists: n,
        typed: total,
        seconds: elapsed,
        server_cores: cores(usage0, usage1),
        server_rss: usage1.map_or(0, |u| u.1),
        loadgen_cores: cores(own0, own1),
        p50_ms: percentile_ms(&latencies, 50.0),
        p99_ms: percentile_ms(&latencies, 99.0),
        max_ms: percentile_ms(&latencies, 100.0),
        lag_at_stop,
        caught_up,
        catch_up_s,
    })
}

/// One typist: connects, joins, syncs the seed, then types until the end and answers what
/// arrives until told to stop.
#[allow(clippy::too_many_arguments)]
async fn typist(
    i: usize,
    n: usize,
    rate: f64,
    url: &str,
    seed: &Seed,
    document: &str,
    shared: &Shared,
    ready: &Barrier,
    mut start_rx: watch::Receiver<Option<(Instant, Instant)>>,
    mut stop_rx: watch::Receiver<bool>,
) -> Result<()> {
    let name = format!("typist-{i}");
    // TCP_NODELAY, as automerge-repo's WebSocket clients (browsers, Node's `ws`) have.
    let (mut ws, _) = timeout(
        HANDSHAKE,
        tokio_tungstenite::connect_async_with_config(url, Some(crate::conn::ws_config()), true),
    )
    .await
    .map_err(|_| format!("{url}: connect timed out"))?
    .map_err(|e| format!("{url}: {e}"))?;
    let join = cbor(vec![
        ("type", Value::Text("join".into())),
        ("senderId", Value::Text(name.clone())),
        ("peerMetadata", Value::Map(Vec::new())),
        (
            "supportedProtocolVersions",
            Value::Array(vec![Value::Text("1".into())]),
        ),
    ])?;
    ws.send(WsMessage::Binary(join.into()))
        .await
        .map_err(|e| e.to_string())?;
    let peer = next_of_type(&mut ws, "peer").await?;
    let server = field(&peer, "senderId")
        .and_then(Value::as_text)
        .map(str::to_owned)
        .ok_or("peer without senderId")?;
    let sync = |data: Vec<u8>| -> Result<WsMessage> {
        Ok(WsMessage::Binary(
            cbor(vec![
                ("type", Value::Text("sync".into())),
                ("senderId", Value::Text(name.clone())),
                ("targetId", Value::Text(server.clone())),
                ("documentId", Value::Text(document.to_owned())),
                ("data", Value::Bytes(data)),
            ])?
            .into(),
        ))
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    bytes[15] = 0x7e;
    let mut graph = Graph::new(ActorId::from(bytes), seed);
    // Everyone sends the seed: the first to arrive creates the document, the rest are no-ops.
    ws.send(sync(graph.message(vec![seed.bytes.clone()]))?)
        .await
        .map_err(|e| e.to_string())?;
    // Wait for the server's answer (it holds the seed then).
    next_of_type(&mut ws, "sync").await?;
    ready.wait().await;
    let (begun, end) = start_rx
        .wait_for(Option::is_some)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no start")?;
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut next = begun + period.mul_f64(i as f64 / n as f64);
    let character = char::from(b'a' + (i % 26) as u8);
    let mut parsed = Vec::new();
    loop {
        let typing = next < end;
        let wake = if typing {
            next
        } else {
            Instant::now() + Duration::from_secs(3600)
        };
        tokio::select! {
            _ = async { stop_rx.wait_for(|s| *s).await.is_ok() } => return Ok(()),
            frame = timeout_at(wake, ws.next()) => match frame {
                Ok(Some(Ok(WsMessage::Binary(bytes)))) => {
                    let Ok(message) = ciborium::from_reader::<Value, _>(&bytes[..]) else {
                        continue;
                    };
                    if field(&message, "type").and_then(Value::as_text) != Some("sync") {
                        continue;
                    }
                    let Some(data) = field(&message, "data").and_then(Value::as_bytes) else {
                        continue;
                    };
                    let decoded = Message::decode(data).map_err(|e| e.to_string())?;
                    parsed.clear();
                    for chunk in decoded.changes.iter() {
                        parse_changes(chunk, &mut parsed).ok_or("a change did not parse")?;
                    }
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_micros() as u64);
                    let mut new = 0;
                    let mut latencies = Vec::new();
                    for p in &parsed {
                        if graph.add(p.hash, &p.deps, p.start_op) {
                            new += 1;
                            if let Some(sent) = p.sent_micros {
                                let micros = now.saturating_sub(sent);
                                latencies.push(u32::try_from(micros).unwrap_or(u32::MAX));
                            }
                        }
                    }
                    if new > 0 {
                        shared.received[i].fetch_add(latencies.len() as u64, Ordering::Relaxed);
                        if let Ok(mut all) = shared.latencies.lock() {
                            all.extend(latencies);
                        }
                        // Answer with our heads, as an automerge-repo client does.
                        ws.send(sync(graph.message(Vec::new()))?)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(format!("typist {i}: {e}")),
                Ok(None) => return Err(format!("typist {i}: closed")),
                Err(_) => {
                    let change = graph.type_one(&seed.text, character)?;
                    ws.send(sync(graph.message(vec![change]))?)
                        .await
                        .map_err(|e| e.to_string())?;
                    shared.typed[i].fetch_add(1, Ordering::Relaxed);
                    next += period;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_change_parses_to_what_automerge_says() {
        let seed = seed().expect("seed");
        let mut graph = Graph::new(ActorId::from([7u8; 16]), &seed);
        let first = graph.type_one(&seed.text, 'a').expect("type");
        let second = graph.type_one(&seed.text, 'b').expect("type");
        let mut parsed = Vec::new();
        let joined = [first.clone(), second.clone()].concat();
        parse_changes(&joined, &mut parsed).expect("parses");
        for (bytes, p) in [first, second].iter().zip(&parsed) {
            let change = automerge::Change::try_from(&bytes[..]).expect("automerge reads it");
            assert_eq!(p.hash, change.hash());
            assert_eq!(p.deps, change.deps());
            assert_eq!(p.start_op, change.start_op().get());
            assert!(p.sent_micros.is_some());
        }
        // And a document that receives the seed and both keystrokes reads "ab".
        let mut doc = AutoCommit::new();
        doc.load_incremental(&seed.bytes).expect("seed");
        doc.load_incremental(&joined).expect("keystrokes");
        let (_, text) = automerge::ReadDoc::get(&doc, ROOT, "text")
            .expect("get")
            .expect("text");
        assert_eq!(automerge::ReadDoc::text(&doc, &text).expect("text"), "ab");
        assert!(parse_changes(b"not a change", &mut parsed).is_none());
    }
}
