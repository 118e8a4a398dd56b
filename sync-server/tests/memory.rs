//! What a connection keeps after a large message: a counting allocator measures the live heap
//! of this test process (the server runs in it) around clients that join a 1 MiB Yjs document;
//! and what an Automerge document keeps of the changes it receives.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use accord_engine::{DocKind, Document, DocumentId, Op, Path, ReplicaId};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::{Message as YMessage, SyncMessage};
use yrs::updates::encoder::Encode;
use yrs::{GetString, ReadTxn, Text, Transact};

/// The system allocator, counting the bytes allocated and not yet freed.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The tests of this file measure the one heap of the process: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DOCUMENT_BYTES: usize = 1 << 20;
const JOINERS: usize = 16;

/// A client with small buffers of its own (tungstenite's default read buffer is 128 KiB, taken
/// when it connects), so that what is measured is what the server keeps.
async fn connect(url: &str) -> Ws {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    tokio_tungstenite::connect_async_with_config(url, Some(config), false)
        .await
        .unwrap()
        .0
}

/// Waits for a binary frame of at least `bytes` on `ws` (dropping it), within ten seconds.
async fn receive_at_least(ws: &mut Ws, bytes: usize) -> bool {
    let read = async {
        while let Some(Ok(message)) = ws.next().await {
            if let WsMessage::Binary(frame) = message {
                if frame.len() >= bytes {
                    return true;
                }
            }
        }
        false
    };
    timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or(false)
}

/// Sends `caught_up` (a sync step 1 with the whole document's state vector) and waits for the
/// server's step 2, within ten seconds. The server handles a connection's messages in order, so
/// once the answer arrives everything `ws` sent before it has been applied and let go: a
/// measurement taken then does not catch the server still holding a large message it is
/// applying (in a debug build, applying a 1 MiB update takes long enough for the heap to look
/// settled while it is still held).
async fn applied(ws: &mut Ws, caught_up: &[u8]) -> bool {
    ws.send(WsMessage::Binary(caught_up.to_vec().into()))
        .await
        .unwrap();
    let answer = async {
        while let Some(Ok(message)) = ws.next().await {
            if let WsMessage::Binary(frame) = message {
                if let Ok(YMessage::Sync(SyncMessage::SyncStep2(_))) =
                    <YMessage as yrs::updates::decoder::Decode>::decode_v1(&frame)
                {
                    return true;
                }
            }
        }
        false
    };
    timeout(Duration::from_secs(10), answer)
        .await
        .unwrap_or(false)
}

/// The live heap once it stops moving (tasks finish freeing what they held).
async fn settled_live() -> isize {
    let mut last = LIVE.load(Ordering::Relaxed);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = LIVE.load(Ordering::Relaxed);
        if (now - last).abs() < 16 * 1024 {
            return now;
        }
        last = now;
    }
    last
}

/// A client that joins a large document is sent all of it, and sent its own copy (Yjs clients
/// answer the server's step 1 with everything they hold): neither message stays allocated in
/// the connection afterwards. Before tungstenite's buffers were patched (vendor/tungstenite),
/// each joined connection kept ~1 MiB for its read buffer and as much for its write buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_does_not_keep_the_largest_message_it_read_or_wrote() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), false)).await;
    let url = format!("ws://{}/yjs/large", server.addr);

    // The document: 1 MiB of text, uploaded by one client.
    let (update, whole) = {
        let doc = yrs::Doc::with_client_id(7);
        let text = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, &"x".repeat(DOCUMENT_BYTES));
        (txn.encode_update_v1(), txn.state_vector())
    };
    // A step 1 from a client that holds everything (answered with an empty step 2).
    let caught_up = YMessage::Sync(SyncMessage::SyncStep1(whole)).encode_v1();
    let upload = YMessage::Sync(SyncMessage::Update(update.clone())).encode_v1();
    let mut uploader = connect(&url).await;
    uploader
        .send(WsMessage::Binary(upload.clone().into()))
        .await
        .unwrap();
    // It is in the document once a fresh client is sent all of it.
    let step1 = YMessage::Sync(SyncMessage::SyncStep1(
        yrs::Doc::new().transact().state_vector(),
    ))
    .encode_v1();
    let join = |ws: Ws| {
        let step1 = step1.clone();
        let upload = upload.clone();
        let caught_up = caught_up.clone();
        async move {
            let mut ws = ws;
            ws.send(WsMessage::Binary(step1.into())).await.unwrap();
            assert!(
                receive_at_least(&mut ws, DOCUMENT_BYTES).await,
                "a joining client was not sent the document"
            );
            // What a Yjs client holds goes back to the server (here: all of it).
            ws.send(WsMessage::Binary(upload.into())).await.unwrap();
            assert!(
                applied(&mut ws, &caught_up).await,
                "the server did not answer after the upload"
            );
            ws
        }
    };
    let first = join(connect(&url).await).await;
    let before = settled_live().await;

    let mut joined = Vec::new();
    for _ in 0..JOINERS {
        let ws = connect(&url).await;
        joined.push(join(ws).await);
    }
    let after = settled_live().await;
    // Measured: ~73 KB, most of it the store's SQLite page cache growing meanwhile (a fixed
    // cost, not a connection's); 4.3 MB with tungstenite unpatched (two 1 MiB messages, each
    // kept at its grown capacity on both sides of the socket).
    let per_connection = (after - before) / JOINERS as isize;
    assert!(
        per_connection < 256 * 1024,
        "each joined connection keeps {per_connection} bytes (the document is {DOCUMENT_BYTES})"
    );

    // The server still holds the document (nothing was lost to the freeing).
    let check = yrs::Doc::new();
    let text = check.get_or_insert_text("t");
    {
        let mut ws = connect(&url).await;
        ws.send(WsMessage::Binary(step1.clone().into()))
            .await
            .unwrap();
        let got = timeout(Duration::from_secs(10), async {
            while let Some(Ok(message)) = ws.next().await {
                if let WsMessage::Binary(frame) = message {
                    if let Ok(YMessage::Sync(SyncMessage::SyncStep2(update))) =
                        <YMessage as yrs::updates::decoder::Decode>::decode_v1(&frame)
                    {
                        return Some(update);
                    }
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .expect("a step 2");
        let update = <yrs::Update as yrs::updates::decoder::Decode>::decode_v1(&got).unwrap();
        check.transact_mut().apply_update(update).unwrap();
    }
    assert_eq!(text.get_string(&check.transact()).len(), DOCUMENT_BYTES);
    drop((first, joined, uploader));
    server.stop().await;
}

/// A WebSocket waiting for its next frame holds no read buffer (the server's idle connections,
/// most of them): with a 64 KiB `read_buffer_size`, a hundred sockets that each read a frame and
/// then found nothing more hold far less than one such buffer each. Unpatched, each held its
/// buffer from the moment it was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_websocket_holds_no_read_buffer() {
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
    use tokio_tungstenite::WebSocketStream;
    const SOCKETS: usize = 100;
    const READ_BUFFER: usize = 64 * 1024;
    let _alone = ONE_AT_A_TIME.lock().await;
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    let before = settled_live().await;
    let mut pairs = Vec::new();
    for _ in 0..SOCKETS {
        let (client_io, server_io) = tokio::io::duplex(4096);
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let mut server =
            WebSocketStream::from_raw_socket(server_io, Role::Server, Some(config)).await;
        client
            .send(WsMessage::Binary(vec![7u8; 100].into()))
            .await
            .unwrap();
        let got = timeout(Duration::from_secs(5), server.next()).await;
        assert!(
            matches!(got, Ok(Some(Ok(WsMessage::Binary(ref b)))) if b.len() == 100),
            "the frame did not arrive"
        );
        // Nothing more to read: the read ends in `WouldBlock` (pending).
        assert!(timeout(Duration::from_millis(1), server.next())
            .await
            .is_err());
        pairs.push((client, server));
    }
    let after = settled_live().await;
    let per_socket = (after - before) / SOCKETS as isize;
    assert!(
        per_socket < (READ_BUFFER / 4) as isize,
        "each waiting socket holds {per_socket} bytes (its read buffer is {READ_BUFFER})"
    );
    drop(pairs);
}

/// A peer types 1,000 characters, one change each, and a document receives them one by one (as
/// a relay does): it holds at most half again what a copy loaded from the same changes at once
/// holds (Automerge keeps changes applied one by one in a larger form: 757,477 bytes against
/// 566,103 when this was written). It used to hold 1,077,868: ~320 more bytes per character,
/// the text splices Automerge 0.12 records in an inactive patch log (see
/// `accord_engine`'s `doc/automerge_apply.rs`).
#[test]
fn a_document_keeps_no_residue_of_the_changes_it_received() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    const CHARS: usize = 1_000;
    let id = DocumentId::from_bytes([7; 16]);
    let mut writer = Document::new(DocKind::Automerge, ReplicaId::from_bytes([1; 16]), id);
    let mut changes = Vec::with_capacity(CHARS);
    for i in 0..CHARS {
        let splice = Op::Splice {
            path: Path::keys(["text"]),
            index: i,
            delete: 0,
            insert: "x".into(),
        };
        let change = writer
            .apply_ops(&[splice])
            .expect("typed")
            .expect("a change");
        changes.push(change.bytes);
    }
    drop(writer);

    let before = LIVE.load(Ordering::Relaxed);
    let mut received = Document::new(DocKind::Automerge, ReplicaId::from_bytes([2; 16]), id);
    for change in &changes {
        received.apply_changes(change).expect("applied");
    }
    let one_by_one = LIVE.load(Ordering::Relaxed) - before;

    let all: Vec<u8> = changes.concat();
    let before = LIVE.load(Ordering::Relaxed);
    let loaded = Document::load(
        DocKind::Automerge,
        ReplicaId::from_bytes([3; 16]),
        id,
        None,
        [all.as_slice()],
    )
    .expect("loaded");
    let at_once = LIVE.load(Ordering::Relaxed) - before;

    assert_eq!(received.to_json(), loaded.to_json());
    assert!(
        one_by_one < at_once + at_once / 2,
        "received one by one: {one_by_one} bytes; loaded at once: {at_once} bytes"
    );
}
