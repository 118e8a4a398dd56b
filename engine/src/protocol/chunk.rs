//! Splitting large messages into frames and joining them again.

use super::codec::{decode, encode, DecodeError, Limits};
use super::message::Message;

/// Bytes a chunk frame adds around its data (tag, stream, index, last flag, length).
const CHUNK_OVERHEAD: usize = 1 + 5 + 5 + 1 + 5;

/// Encodes `message` as frames of at most `max_frame_bytes` each: one frame when it fits,
/// otherwise consecutive [`Message::Chunk`] frames tagged `stream`.
pub fn encode_frames(message: &Message, max_frame_bytes: usize, stream: u32) -> Vec<Vec<u8>> {
    let bytes = encode(message);
    if bytes.len() <= max_frame_bytes {
        return vec![bytes];
    }
    let part = max_frame_bytes.saturating_sub(CHUNK_OVERHEAD).max(1);
    let count = bytes.len().div_ceil(part);
    bytes
        .chunks(part)
        .enumerate()
        .map(|(index, data)| {
            encode(&Message::Chunk {
                stream,
                index: index as u32,
                last: index + 1 == count,
                data: data.to_vec(),
            })
        })
        .collect()
}

/// Joins chunk frames back into messages, up to a message size limit.
#[derive(Debug)]
pub struct Reassembler {
    limits: Limits,
    partial: Option<Partial>,
}

#[derive(Debug)]
struct Partial {
    stream: u32,
    next_index: u32,
    bytes: Vec<u8>,
}

impl Reassembler {
    /// A reassembler enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            partial: None,
        }
    }

    /// Bytes held for a message not yet complete.
    pub fn buffered_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.bytes.len())
    }

    /// Takes one frame. Returns a message when the frame completes one, `None` while chunks of
    /// a message are still arriving, or an error for a malformed or oversized frame or message
    /// (after which the partial message is dropped).
    pub fn push(&mut self, frame: &[u8]) -> Result<Option<Message>, DecodeError> {
        if frame.len() > self.limits.max_frame_bytes {
            self.partial = None;
            return Err(DecodeError::TooLarge {
                what: "frame",
                size: frame.len(),
                limit: self.limits.max_frame_bytes,
            });
        }
        let message = decode(frame, &self.limits)?;
        let Message::Chunk {
            stream,
            index,
            last,
            data,
        } = message
        else {
            if self.partial.is_some() {
                self.partial = None;
                return Err(DecodeError::ChunkSequence(
                    "a message interrupted a chunked message",
                ));
            }
            return Ok(Some(message));
        };
        let partial = match self.partial.take() {
            None if index == 0 => Partial {
                stream,
                next_index: 0,
                bytes: Vec::new(),
            },
            None => return Err(DecodeError::ChunkSequence("first chunk index is not 0")),
            Some(p) if p.stream == stream && p.next_index == index => p,
            Some(_) => return Err(DecodeError::ChunkSequence("chunks interleaved or missing")),
        };
        let size = partial.bytes.len() + data.len();
        if size > self.limits.max_message_bytes {
            return Err(DecodeError::TooLarge {
                what: "message",
                size,
                limit: self.limits.max_message_bytes,
            });
        }
        let mut partial = partial;
        partial.bytes.extend_from_slice(&data);
        partial.next_index = partial.next_index.saturating_add(1);
        if !last {
            self.partial = Some(partial);
            return Ok(None);
        }
        let inner = Limits {
            max_frame_bytes: self.limits.max_message_bytes,
            ..self.limits
        };
        match decode(&partial.bytes, &inner)? {
            Message::Chunk { .. } => Err(DecodeError::ChunkSequence("a chunk inside a chunk")),
            message => Ok(Some(message)),
        }
    }
}
