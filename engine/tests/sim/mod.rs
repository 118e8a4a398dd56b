//! A deterministic network of replicas for tests: frames sit in per-link queues until the test
//! delivers, reorders, duplicates or drops them. No sockets, no clock: a seed replays a run.

#![allow(dead_code)]

use std::collections::VecDeque;

use accord_engine::replica::{Replica, ReplicaConfig, ReplicaError};
use accord_engine::storage::MemoryStorage;
use accord_engine::{DocError, DocKind, DocumentId, Op, Path, PeerId, ReplicaId};
use serde_json::json;

/// A small seeded PRNG (xorshift64*), so a failing case replays from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

pub struct Net {
    pub replicas: Vec<Replica<MemoryStorage>>,
    /// links[from][to]: frames in flight from `from` to `to`.
    links: Vec<Vec<VecDeque<Vec<u8>>>>,
    pub connected: Vec<Vec<bool>>,
    pub documents: Vec<DocumentId>,
    pub errors: usize,
}

impl Net {
    pub fn new(count: usize) -> Self {
        let replicas = (0..count)
            .map(|i| {
                Replica::open(
                    MemoryStorage::new(),
                    ReplicaId::from_bytes([i as u8 + 1; 16]),
                    ReplicaConfig::default(),
                )
                .expect("replica opens")
            })
            .collect();
        Self {
            replicas,
            links: vec![vec![VecDeque::new(); count]; count],
            connected: vec![vec![false; count]; count],
            documents: Vec::new(),
            errors: 0,
        }
    }

    /// Creates a document on replica 0 with `ops` as its first change.
    pub fn create(&mut self, kind: DocKind, document: DocumentId, ops: &[Op]) {
        self.replicas[0].create(document, kind).expect("create");
        self.replicas[0].change(document, ops).expect("init");
        self.documents.push(document);
        self.collect(0);
    }

    pub fn connect(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            self.links[x][y].clear();
            self.replicas[x].disconnect(PeerId(y as u64));
            self.replicas[x].connect_peer(PeerId(y as u64));
            self.connected[x][y] = true;
        }
        for (x, y) in [(a, b), (b, a)] {
            for document in self.documents.clone() {
                if self.replicas[x].contains(document) {
                    self.replicas[x]
                        .sync_document(PeerId(y as u64), document)
                        .expect("sync");
                }
            }
            self.collect(x);
        }
    }

    pub fn disconnect(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            self.links[x][y].clear();
            self.replicas[x].disconnect(PeerId(y as u64));
            self.connected[x][y] = false;
        }
    }

    pub fn connect_all(&mut self) {
        let n = self.replicas.len();
        for a in 0..n {
            for b in a + 1..n {
                self.connect(a, b);
            }
        }
    }

    pub fn disconnect_all(&mut self) {
        let n = self.replicas.len();
        for a in 0..n {
            for b in a + 1..n {
                self.disconnect(a, b);
            }
        }
    }

    /// Moves replica `i`'s outgoing frames onto its links (dropping those to disconnected peers).
    pub fn collect(&mut self, i: usize) {
        while let Some(t) = self.replicas[i].poll_transmit() {
            let to = t.peer.0 as usize;
            if self.connected[i][to] {
                self.links[i][to].push_back(t.frame);
            }
        }
        while self.replicas[i].poll_event().is_some() {}
    }

    pub fn in_flight(&self) -> usize {
        self.links.iter().flatten().map(VecDeque::len).sum()
    }

    fn nonempty_links(&self) -> Vec<(usize, usize)> {
        let n = self.replicas.len();
        (0..n)
            .flat_map(|a| (0..n).map(move |b| (a, b)))
            .filter(|(a, b)| !self.links[*a][*b].is_empty())
            .collect()
    }

    /// Delivers the frame at `index` of link `from -> to`. A frame the receiver refuses ends
    /// the session, as a closed socket would; the pair reconnects with fresh sync state.
    pub fn deliver_at(&mut self, from: usize, to: usize, index: usize) {
        let Some(frame) = self.links[from][to].remove(index) else {
            return;
        };
        if self.replicas[to]
            .handle_frame(PeerId(from as u64), &frame)
            .is_err()
        {
            self.errors += 1;
            self.connect(from, to);
            return;
        }
        self.collect(to);
    }

    /// Delivers everything in order until the network is quiet.
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            let links = self.nonempty_links();
            if links.is_empty() {
                return;
            }
            for (from, to) in links {
                self.deliver_at(from, to, 0);
            }
        }
        panic!("the network did not go quiet");
    }

    /// One random step of chaos.
    pub fn chaos_step(&mut self, rng: &mut Rng) {
        let links = self.nonempty_links();
        let n = self.replicas.len();
        match rng.below(10) {
            0..=4 if !links.is_empty() => {
                let (from, to) = links[rng.below(links.len())];
                let len = self.links[from][to].len();
                // Mostly in order, sometimes reordered.
                let index = if rng.chance(70) { 0 } else { rng.below(len) };
                self.deliver_at(from, to, index);
            }
            5 if !links.is_empty() => {
                let (from, to) = links[rng.below(links.len())];
                let len = self.links[from][to].len();
                let frame = self.links[from][to][rng.below(len)].clone();
                self.links[from][to].push_back(frame);
            }
            6 if !links.is_empty() => {
                let (from, to) = links[rng.below(links.len())];
                let len = self.links[from][to].len();
                self.links[from][to].remove(rng.below(len));
            }
            7 => {
                let a = rng.below(n);
                let b = (a + 1 + rng.below(n - 1)) % n;
                if self.connected[a][b] {
                    self.disconnect(a, b);
                } else {
                    self.connect(a, b);
                }
            }
            _ => {
                let i = rng.below(n);
                self.random_edit(i, rng);
            }
        }
    }

    /// A random edit on replica `i` of a random document it holds.
    pub fn random_edit(&mut self, i: usize, rng: &mut Rng) {
        let held: Vec<DocumentId> = self
            .documents
            .iter()
            .copied()
            .filter(|d| self.replicas[i].contains(*d))
            .collect();
        if held.is_empty() {
            return;
        }
        let document = held[rng.below(held.len())];
        let state = self.replicas[i].json(document).expect("json");
        let text_len = state["m"]["notes"]
            .as_str()
            .map_or(0, |s| s.encode_utf16().count());
        let list_len = state["m"]["list"].as_array().map_or(0, Vec::len);
        let key = format!("k{}", rng.below(4));
        let op = match rng.below(6) {
            0 => Op::Put {
                path: Path::keys(["m", key.as_str()]),
                value: json!(rng.below(1000)),
            },
            1 => Op::Delete {
                path: Path::keys(["m", key.as_str()]),
            },
            2 => Op::Increment {
                path: Path::keys(["m", "count"]),
                by: rng.below(10) as i64 - 3,
            },
            3 => Op::Insert {
                path: Path::keys(["m", "list"]),
                index: rng.below(list_len + 1),
                value: json!(format!("r{i}-{}", rng.below(100))),
            },
            _ => {
                let index = rng.below(text_len + 1);
                let delete = if rng.chance(30) {
                    rng.below(text_len - index + 1).min(3)
                } else {
                    0
                };
                Op::Splice {
                    path: Path::keys(["m", "notes"]),
                    index,
                    delete,
                    insert: ["a", "é", "xy", "🙂", ""][rng.below(5)].into(),
                }
            }
        };
        // A splice inside a surrogate pair is refused (that is the engine guarding the text);
        // any other error would be a bug.
        match self.replicas[i].change(document, &[op]) {
            Ok(_) | Err(ReplicaError::Doc(DocError::SplitsCharacter { .. })) => {}
            Err(e) => panic!("edit failed: {e}"),
        }
        self.collect(i);
    }

    pub fn states(&mut self, document: DocumentId) -> Vec<serde_json::Value> {
        self.replicas
            .iter_mut()
            .map(|r| r.json(document).expect("json"))
            .collect()
    }
}

/// The structure every test document starts with.
pub fn init_ops() -> Vec<Op> {
    vec![
        Op::Put {
            path: Path::keys(["m"]),
            value: json!({"list": [], "k0": 0}),
        },
        Op::Increment {
            path: Path::keys(["m", "count"]),
            by: 0,
        },
        Op::Splice {
            path: Path::keys(["m", "notes"]),
            index: 0,
            delete: 0,
            insert: "start".into(),
        },
    ]
}
