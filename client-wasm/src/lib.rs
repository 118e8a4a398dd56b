//! Accord's engine for the browser: wasm-bindgen bindings over `accord_engine::Replica`.
//!
//! [`WasmReplica`] is the engine's `Replica` on a [`KvStorage`], driven sans-IO by the
//! TypeScript wrapper (`ts/index.ts`), which owns the WebSocket, IndexedDB, timers and
//! randomness. Structured values cross the boundary as JSON text (documents, ops, events,
//! conflicts) and byte arrays (frames, stored values); ids are strings (UUIDs, hex change ids).
//!
//! After every call the driver drains, in this order: [`WasmReplica::take_writes`] (commit them
//! to IndexedDB), then [`WasmReplica::take_frames`] (send them), then
//! [`WasmReplica::take_events`] (tell the app).

pub mod storage;

use accord_engine::invariant::{self, Schema};
use accord_engine::replica::{ChangeStatus, Event, Origin, Replica, ReplicaConfig};
use accord_engine::{ChangeId, DocKind, DocumentId, Op, PeerId, ReplicaId};
use js_sys::{Array, Object, Reflect, Uint8Array};
use serde_json::{json, Value};
use wasm_bindgen::prelude::*;

pub use storage::{KvStorage, KvWrite};

fn err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn doc_id(id: &str) -> Result<DocumentId, JsError> {
    id.parse()
        .map_err(|_| JsError::new(&format!("not a document id: {id:?}")))
}

fn kind_of(kind: &str) -> Result<DocKind, JsError> {
    match kind {
        "automerge" => Ok(DocKind::Automerge),
        "yrs" | "yjs" => Ok(DocKind::Yrs),
        other => Err(JsError::new(&format!(
            "unknown document kind {other:?} (automerge or yrs)"
        ))),
    }
}

fn random16(bytes: &[u8]) -> Result<[u8; 16], JsError> {
    bytes
        .try_into()
        .map_err(|_| JsError::new("expected 16 random bytes"))
}

fn status_json(status: ChangeStatus) -> Value {
    match status {
        ChangeStatus::Pending => json!({"status": "pending"}),
        ChangeStatus::Confirmed { seq } => json!({"status": "confirmed", "seq": seq}),
        ChangeStatus::Rejected { code, reason } => {
            json!({"status": "rejected", "code": format!("{code:?}"), "reason": reason})
        }
        ChangeStatus::Compensated {
            violation,
            invariant,
            reason,
            by,
        } => json!({"status": "compensated", "violation": violation, "invariant": invariant,
                    "reason": reason, "by": by}),
        ChangeStatus::Unknown => json!({"status": "unknown"}),
    }
}

fn event_json(event: Event) -> Value {
    match event {
        Event::DocumentChanged { document, origin } => json!({
            "type": "change", "document": document.to_string(),
            "origin": match origin { Origin::Local => "local", Origin::Peer(_) => "remote" },
        }),
        Event::Confirmed {
            document,
            change,
            seq,
        } => json!({"type": "confirmed", "document": document.to_string(),
                    "change": change.to_hex(), "seq": seq}),
        Event::Rejected {
            document,
            change,
            code,
            reason,
        } => json!({"type": "rejected", "document": document.to_string(),
                    "change": change.to_hex(), "code": format!("{code:?}"), "reason": reason}),
        Event::Connected { .. } => json!({"type": "connected"}),
        Event::Subscribed {
            document,
            head_seq,
            read_only,
            ..
        } => json!({"type": "subscribed", "document": document.to_string(),
                    "headSeq": head_seq, "readOnly": read_only}),
        Event::Violations {
            document,
            violations,
        } => json!({"type": "violations", "document": document.to_string(),
                    "violations": violations.into_iter()
                        .map(|(invariant, reason)| json!({"invariant": invariant, "reason": reason}))
                        .collect::<Vec<_>>()}),
        Event::Compensated {
            document,
            change,
            violation,
            reason,
        } => json!({"type": "compensated", "document": document.to_string(),
                    "change": change.to_hex(), "violation": violation, "reason": reason}),
        Event::PeerError {
            code,
            document,
            message,
            ..
        } => json!({"type": "peerError", "code": format!("{code:?}"),
                    "document": document.map(|d| d.to_string()), "message": message}),
    }
}

/// The engine's replica on an in-memory store whose writes go to IndexedDB.
#[wasm_bindgen]
pub struct WasmReplica {
    inner: Replica<KvStorage>,
    next_peer: u64,
    peer: Option<PeerId>,
}

#[wasm_bindgen]
impl WasmReplica {
    /// Opens a replica from the stored pairs (`keys[i]` holds `values[i]`, as read from
    /// IndexedDB); `fresh_id` (16 random bytes) becomes the replica id of an empty store.
    #[wasm_bindgen(constructor)]
    pub fn new(
        keys: Vec<String>,
        values: Vec<Uint8Array>,
        fresh_id: &[u8],
    ) -> Result<WasmReplica, JsError> {
        if keys.len() != values.len() {
            return Err(JsError::new("keys and values differ in length"));
        }
        let values: Vec<Vec<u8>> = values.iter().map(Uint8Array::to_vec).collect();
        let store =
            KvStorage::load(keys.into_iter().zip(values.iter().map(Vec::as_slice))).map_err(err)?;
        let inner = Replica::open(
            store,
            ReplicaId::from_bytes(random16(fresh_id)?),
            ReplicaConfig::default(),
        )
        .map_err(err)?;
        Ok(WasmReplica {
            inner,
            next_peer: 0,
            peer: None,
        })
    }

    /// This replica's id.
    #[wasm_bindgen(js_name = replicaId)]
    pub fn replica_id(&self) -> String {
        self.inner.id().to_string()
    }

    /// Every document held, as JSON `[[id, kind], ...]`.
    pub fn documents(&self) -> String {
        let list: Vec<Value> = self
            .inner
            .documents()
            .map(|(id, kind)| json!([id.to_string(), kind.to_string()]))
            .collect();
        Value::Array(list).to_string()
    }

    /// Creates a document with a fresh id (from 16 random bytes); returns the id. With
    /// `doc_type`, its first change declares the type (whose schema the server enforces).
    pub fn create(
        &mut self,
        random: &[u8],
        kind: &str,
        doc_type: Option<String>,
    ) -> Result<String, JsError> {
        let kind = kind_of(kind)?;
        let id = DocumentId::from_random_bytes(random16(random)?);
        self.inner.create(id, kind).map_err(err)?;
        if let Some(t) = doc_type {
            self.inner
                .change(id, &[invariant::type_op(kind, &t)])
                .map_err(err)?;
        }
        self.subscribe_if_connected(id)?;
        Ok(id.to_string())
    }

    /// Makes sure the replica holds `id` (an empty document of `kind` if not, filled by sync);
    /// returns the kind it has.
    pub fn ensure(&mut self, id: &str, kind: &str) -> Result<String, JsError> {
        let document = doc_id(id)?;
        if !self.inner.contains(document) {
            self.inner.create(document, kind_of(kind)?).map_err(err)?;
            self.subscribe_if_connected(document)?;
        }
        Ok(self
            .inner
            .documents()
            .find(|(d, _)| *d == document)
            .map(|(_, k)| k.to_string())
            .unwrap_or_default())
    }

    /// Whether the replica holds `id`.
    pub fn contains(&self, id: &str) -> Result<bool, JsError> {
        Ok(self.inner.contains(doc_id(id)?))
    }

    /// Applies JSON ops (`[{"op":"put","path":[...],"value":...}, ...]`) as one change; returns
    /// its id (hex), or undefined when nothing changed.
    pub fn change(&mut self, id: &str, ops: &str) -> Result<Option<String>, JsError> {
        let ops: Vec<Op> = serde_json::from_str(ops).map_err(err)?;
        let change = self.inner.change(doc_id(id)?, &ops).map_err(err)?;
        Ok(change.map(|c| c.to_hex()))
    }

    /// The document's state as JSON text.
    pub fn json(&mut self, id: &str) -> Result<String, JsError> {
        Ok(self.inner.json(doc_id(id)?).map_err(err)?.to_string())
    }

    /// The document's declared type, if any.
    #[wasm_bindgen(js_name = docType)]
    pub fn doc_type(&mut self, id: &str) -> Result<Option<String>, JsError> {
        let doc = self.inner.document(doc_id(id)?).map_err(err)?;
        Ok(invariant::read_type(doc))
    }

    /// Where a change stands, as JSON `{"status": "pending"|"confirmed"|"rejected"|
    /// "compensated"|"unknown", ...}`.
    #[wasm_bindgen(js_name = changeStatus)]
    pub fn change_status(&mut self, id: &str, change: &str) -> Result<String, JsError> {
        let change = ChangeId::from_hex(change).ok_or_else(|| JsError::new("bad change id"))?;
        let status = self.inner.change_status(doc_id(id)?, change).map_err(err)?;
        Ok(status_json(status).to_string())
    }

    /// Unconfirmed local changes of `id` (hex ids, oldest first), as JSON.
    pub fn pending(&self, id: &str) -> Result<String, JsError> {
        let document = doc_id(id)?;
        let list: Vec<String> = self
            .inner
            .outbox()
            .filter(|e| e.document == document)
            .map(|e| e.change.to_hex())
            .collect();
        Ok(json!(list).to_string())
    }

    /// Unconfirmed local changes across all documents.
    #[wasm_bindgen(js_name = outboxLen)]
    pub fn outbox_len(&self) -> u32 {
        self.inner.storage().outbox_len() as u32
    }

    /// The open conflicts of `id`, as JSON `[{key, invariant, path, question, options, ...}]`.
    pub fn conflicts(&mut self, id: &str) -> Result<String, JsError> {
        let list: Vec<Value> = self
            .inner
            .conflicts(doc_id(id)?)
            .map_err(err)?
            .into_iter()
            .map(|(key, c)| {
                let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert("key".into(), Value::String(key));
                }
                v
            })
            .collect();
        Ok(Value::Array(list).to_string())
    }

    /// Settles conflict `key` with option `choice`, decided by `by`; returns the change id.
    #[wasm_bindgen(js_name = resolveConflict)]
    pub fn resolve_conflict(
        &mut self,
        id: &str,
        key: &str,
        choice: u32,
        by: &str,
    ) -> Result<Option<String>, JsError> {
        let change = self
            .inner
            .resolve_conflict(doc_id(id)?, key, choice as usize, by)
            .map_err(err)?;
        Ok(change.map(|c| c.to_hex()))
    }

    /// Adds a schema (JSON) whose invariants are checked locally to warn (`violations` events).
    #[wasm_bindgen(js_name = addSchema)]
    pub fn add_schema(&mut self, schema: &str) -> Result<(), JsError> {
        self.inner
            .add_schema(Schema::from_json(schema).map_err(err)?);
        Ok(())
    }

    /// The open violations of `id` under its schema, as JSON.
    #[wasm_bindgen(js_name = checkInvariants)]
    pub fn check_invariants(&mut self, id: &str) -> Result<String, JsError> {
        let list: Vec<Value> = self
            .inner
            .check_invariants(doc_id(id)?)
            .map_err(err)?
            .into_iter()
            .map(|v| json!({"invariant": v.invariant, "reason": v.reason}))
            .collect();
        Ok(Value::Array(list).to_string())
    }

    /// Starts a session with the server (a new connection): queues Hello and subscribes every
    /// document once welcomed. Any previous session is forgotten.
    pub fn connect(&mut self, token: Option<String>) -> Result<(), JsError> {
        if let Some(old) = self.peer.take() {
            self.inner.disconnect(old);
        }
        self.next_peer += 1;
        let peer = PeerId(self.next_peer);
        self.peer = Some(peer);
        self.inner.connect_upstream(peer, token);
        let docs: Vec<DocumentId> = self.inner.documents().map(|(d, _)| d).collect();
        for document in docs {
            self.inner.sync_document(peer, document).map_err(err)?;
        }
        Ok(())
    }

    /// Ends the session (the socket closed). Documents and outbox stay.
    pub fn disconnect(&mut self) {
        if let Some(peer) = self.peer.take() {
            self.inner.disconnect(peer);
        }
    }

    /// Handles one frame from the server.
    #[wasm_bindgen(js_name = handleFrame)]
    pub fn handle_frame(&mut self, frame: &[u8]) -> Result<(), JsError> {
        let peer = self.peer.ok_or_else(|| JsError::new("not connected"))?;
        self.inner.handle_frame(peer, frame).map_err(err)
    }

    /// The storage writes since the last call, as `[{op: "put", key, value} | {op: "delete",
    /// key} | {op: "deleteRange", from, to}]`. Commit them (one transaction) before sending the
    /// frames taken after them.
    #[wasm_bindgen(js_name = takeWrites)]
    pub fn take_writes(&mut self) -> Array {
        let out = Array::new();
        for w in self.inner.storage().take_writes() {
            let o = Object::new();
            let set = |k: &str, v: &JsValue| {
                let _ = Reflect::set(&o, &JsValue::from_str(k), v);
            };
            match w {
                KvWrite::Put(k, v) => {
                    set("op", &"put".into());
                    set("key", &k.into());
                    set("value", &Uint8Array::from(v.as_slice()).into());
                }
                KvWrite::Delete(k) => {
                    set("op", &"delete".into());
                    set("key", &k.into());
                }
                KvWrite::DeleteRange(from, to) => {
                    set("op", &"deleteRange".into());
                    set("from", &from.into());
                    set("to", &to.into());
                }
            }
            out.push(&o);
        }
        out
    }

    /// The frames to send to the server, in order (frames of a closed session are dropped).
    #[wasm_bindgen(js_name = takeFrames)]
    pub fn take_frames(&mut self) -> Array {
        let out = Array::new();
        while let Some(t) = self.inner.poll_transmit() {
            if Some(t.peer) == self.peer {
                out.push(&Uint8Array::from(t.frame.as_slice()));
            }
        }
        out
    }

    /// What happened since the last call, as a JSON array of events.
    #[wasm_bindgen(js_name = takeEvents)]
    pub fn take_events(&mut self) -> String {
        let mut list = Vec::new();
        while let Some(e) = self.inner.poll_event() {
            list.push(event_json(e));
        }
        Value::Array(list).to_string()
    }
}

impl WasmReplica {
    fn subscribe_if_connected(&mut self, document: DocumentId) -> Result<(), JsError> {
        if let Some(peer) = self.peer {
            self.inner.sync_document(peer, document).map_err(err)?;
        }
        Ok(())
    }
}
