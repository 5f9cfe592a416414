//! Frame format: how one record sits in a segment.
//!
//! ```text
//! offset  size  field
//!  0       4    len_flags  u32 LE: bits 0..31 payload length in bytes (> 0),
//!                          bit 31 GROUP_START (first frame of a group commit)
//!  4       4    crc        u32 LE: CRC32C of bytes 0..4, then bytes 8..16, then the payload
//!  8       8    lsn        u64 LE: the record's log sequence number
//! 16       len  payload    rkyv archive of a `Record` (root at the end, as rkyv writes it)
//! 16+len   ..   zero padding up to the next multiple of 16
//! ```
//!
//! Frames start at multiples of 16 inside a segment, so the payload is 16-aligned in any buffer
//! that is itself 16-aligned, and rkyv can validate it in place. A header of 16 zero bytes means
//! "no frame here" (segments are zero-filled). The CRC is the integrity check: rkyv validation
//! alone accepts many corrupted archives (a flipped byte inside a string is still a valid string).
//! The LSN in the header makes misplaced or stale frames detectable: the frame at a given place
//! must carry the next expected LSN.
//!
//! `GROUP_START` lets recovery tell a torn tail from corruption: group commits are written one
//! after the other, each only after the previous one's fdatasync returned, so a valid group-start
//! frame *after* a bad frame proves the bad frame's group had been synced, i.e. the bad frame is
//! corruption, not a torn write.

use crate::record::{ArchivedRecord, Record};

/// Frames start (and end) at multiples of this.
pub const FRAME_ALIGN: usize = 16;
/// Size of the frame header.
pub const HEADER_LEN: usize = 16;
/// Flag bit in `len_flags`: first frame of a group commit.
pub const GROUP_START: u32 = 1 << 31;
/// Largest payload a frame can describe (the segment size is the tighter bound in practice).
pub const MAX_PAYLOAD_LEN: usize = (GROUP_START - 1) as usize;

/// `n` rounded up to a multiple of [`FRAME_ALIGN`].
pub const fn pad16(n: usize) -> usize {
    (n + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1)
}

/// Total size of a frame holding `payload_len` bytes.
pub const fn frame_len(payload_len: usize) -> usize {
    HEADER_LEN + pad16(payload_len)
}

fn frame_crc(header: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&header[0..4]);
    let crc = crc32c::crc32c_append(crc, &header[8..16]);
    crc32c::crc32c_append(crc, payload)
}

/// Appends one frame for `record` with `lsn` to `buf`, whose length must be a multiple of 16
/// (so the archive is laid out for a 16-aligned position). Returns the frame's length.
pub fn encode(buf: &mut Vec<u8>, lsn: u64, record: &Record) -> Result<usize, EncodeError> {
    let start = buf.len();
    assert_eq!(start % FRAME_ALIGN, 0, "frames start at multiples of 16");
    buf.resize(start + HEADER_LEN, 0);
    let buf_taken = std::mem::take(buf);
    let mut out = match rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(record, buf_taken) {
        Ok(out) => out,
        Err(e) => return Err(EncodeError::Serialize(e.to_string())),
    };
    let payload_len = out.len() - start - HEADER_LEN;
    if payload_len == 0 || payload_len > MAX_PAYLOAD_LEN {
        out.truncate(start);
        *buf = out;
        return Err(EncodeError::TooLarge { payload_len });
    }
    out.resize(start + frame_len(payload_len), 0);
    let (head, payload) = out[start..].split_at_mut(HEADER_LEN);
    head[0..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    head[8..16].copy_from_slice(&lsn.to_le_bytes());
    let crc = frame_crc(head, &payload[..payload_len]);
    head[4..8].copy_from_slice(&crc.to_le_bytes());
    *buf = out;
    Ok(frame_len(payload_len))
}

/// Marks the frame at the start of `frame` as the first of a group commit (recomputes its CRC).
/// `frame` must start with a frame written by [`encode`].
pub fn mark_group_start(frame: &mut [u8]) {
    let len_flags = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
    let payload_len = (len_flags & !GROUP_START) as usize;
    frame[0..4].copy_from_slice(&(len_flags | GROUP_START).to_le_bytes());
    let (head, payload) = frame.split_at_mut(HEADER_LEN);
    let crc = frame_crc(head, &payload[..payload_len]);
    head[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Why a record could not be framed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// rkyv failed to serialize the record.
    #[error("cannot serialize record: {0}")]
    Serialize(String),
    /// The archive does not fit a frame.
    #[error("record of {payload_len} bytes does not fit a frame")]
    TooLarge {
        /// Archived size.
        payload_len: usize,
    },
}

/// What [`decode`] found at a position.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A valid frame.
    Frame {
        /// Its LSN.
        lsn: u64,
        /// Whether it starts a group commit.
        group_start: bool,
        /// The record, validated in place.
        record: &'a ArchivedRecord,
        /// Bytes to skip to the next frame.
        frame_len: usize,
    },
    /// 16 zero bytes (or a zero-filled remainder shorter than a header): nothing was written here.
    Empty,
    /// Something that is not a valid frame.
    Bad(BadFrame),
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadFrame {
    /// Fewer bytes than a header left, not all zero.
    #[error("truncated header")]
    Truncated,
    /// Length 0 with a non-zero header, or a frame running past the end of the segment.
    #[error("impossible length {0}")]
    Length(u32),
    /// The checksum does not match.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// The checksum matches but the payload is not a valid archive (a format or version mismatch,
    /// not bit rot).
    #[error("checksum matches but the archive is invalid: {0}")]
    Archive(String),
}

/// Every record of a buffer of frames (from offset 0 to its end or the first zero header), for
/// files of frames outside the log (copied to an aligned buffer first; `bytes` need no
/// alignment). Never panics, whatever the bytes.
pub fn decode_all(bytes: &[u8]) -> Result<Vec<Record>, BadFrame> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < aligned.len() {
        match decode(&aligned, pos) {
            Decoded::Frame { record, frame_len, .. } => {
                out.push(record.to_record().map_err(|e| BadFrame::Archive(e.to_string()))?);
                pos += frame_len;
            }
            Decoded::Empty => break,
            Decoded::Bad(b) => return Err(b),
        }
    }
    Ok(out)
}

/// Decodes the frame at `pos` of `seg`. `seg` must be 16-aligned in memory (for in-place
/// validation); `pos` a multiple of 16. Never panics, whatever the bytes.
pub fn decode(seg: &[u8], pos: usize) -> Decoded<'_> {
    let Some(rest) = seg.get(pos..) else {
        return Decoded::Empty;
    };
    if rest.len() < HEADER_LEN {
        return if rest.iter().all(|&b| b == 0) {
            Decoded::Empty
        } else {
            Decoded::Bad(BadFrame::Truncated)
        };
    }
    let head = &rest[..HEADER_LEN];
    let len_flags = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let payload_len = (len_flags & !GROUP_START) as usize;
    if payload_len == 0 {
        return if head.iter().all(|&b| b == 0) {
            Decoded::Empty
        } else {
            Decoded::Bad(BadFrame::Length(len_flags))
        };
    }
    let flen = frame_len(payload_len);
    if flen > rest.len() {
        return Decoded::Bad(BadFrame::Length(len_flags));
    }
    let payload = &rest[HEADER_LEN..HEADER_LEN + payload_len];
    let stored = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let computed = frame_crc(head, payload);
    if stored != computed {
        return Decoded::Bad(BadFrame::Crc { stored, computed });
    }
    let mut lsn_bytes = [0u8; 8];
    lsn_bytes.copy_from_slice(&head[8..16]);
    let lsn = u64::from_le_bytes(lsn_bytes);
    match rkyv::access::<ArchivedRecord, rkyv::rancor::Error>(payload) {
        Ok(record) => Decoded::Frame {
            lsn,
            group_start: len_flags & GROUP_START != 0,
            record,
            frame_len: flen,
        },
        Err(e) => Decoded::Bad(BadFrame::Archive(e.to_string())),
    }
}

/// Like [`decode`] but only checks length and checksum (no archive validation): used when
/// searching past a bad frame for evidence of later groups. Returns `(lsn, group_start)`.
pub fn probe(seg: &[u8], pos: usize) -> Option<(u64, bool)> {
    let rest = seg.get(pos..)?;
    let head = rest.get(..HEADER_LEN)?;
    let len_flags = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let payload_len = (len_flags & !GROUP_START) as usize;
    if payload_len == 0 || frame_len(payload_len) > rest.len() {
        return None;
    }
    let stored = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if stored != frame_crc(head, &rest[HEADER_LEN..HEADER_LEN + payload_len]) {
        return None;
    }
    let mut lsn_bytes = [0u8; 8];
    lsn_bytes.copy_from_slice(&head[8..16]);
    Some((u64::from_le_bytes(lsn_bytes), len_flags & GROUP_START != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{OutboundState, StoredMessage};
    use proptest::prelude::*;
    use rkyv::util::AlignedVec;

    fn sample_records() -> Vec<Record> {
        let msg = StoredMessage {
            topic: "sensors/1/temp".into(),
            qos: 1,
            retain: true,
            payload: b"21.5".to_vec(),
            properties: vec![0x01, 0x01],
            expires_at_ms: Some(1_700_000_000_000),
        };
        vec![
            Record::RetainedSet {
                message: msg.clone(),
            },
            Record::RetainedClear {
                topic: "a/b".into(),
            },
            Record::SessionCreate {
                client_id: "c1".into(),
                protocol_level: 5,
                session_expiry_secs: 3600,
            },
            Record::MessageEnqueued {
                client_id: "c1".into(),
                msg_id: 7,
                message: msg,
            },
            Record::Outbound {
                client_id: "c1".into(),
                msg_id: 7,
                state: OutboundState::Sent { packet_id: 3 },
            },
            Record::InboundQos2Received {
                client_id: "c1".into(),
                packet_id: 65535,
            },
            Record::Checkpoint {
                kind: 1,
                data: vec![0xAB; 1000],
            },
        ]
    }

    /// Copies into a 16-aligned buffer, as storage hands segments to recovery.
    fn aligned(bytes: &[u8]) -> AlignedVec<16> {
        let mut v = AlignedVec::<16>::new();
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn round_trip_every_sample_record() {
        let mut buf = Vec::new();
        let records = sample_records();
        let mut lens = Vec::new();
        for (i, r) in records.iter().enumerate() {
            lens.push(encode(&mut buf, 100 + i as u64, r).unwrap());
        }
        let seg = aligned(&buf);
        let mut pos = 0;
        for (i, r) in records.iter().enumerate() {
            match decode(&seg, pos) {
                Decoded::Frame {
                    lsn,
                    group_start,
                    record,
                    frame_len,
                } => {
                    assert_eq!(lsn, 100 + i as u64);
                    assert!(!group_start);
                    assert_eq!(frame_len, lens[i]);
                    assert_eq!(&record.to_record().unwrap(), r);
                    pos += frame_len;
                }
                other => panic!("frame {i}: {other:?}"),
            }
        }
        assert!(matches!(decode(&seg, pos), Decoded::Empty));
    }

    #[test]
    fn frames_are_padded_to_16_with_zeros() {
        for n in [0usize, 1, 15, 16, 17, 100, 1000] {
            let r = Record::Checkpoint {
                kind: 0,
                data: vec![0xFF; n],
            };
            let mut buf = Vec::new();
            let len = encode(&mut buf, 0, &r).unwrap();
            assert_eq!(len % FRAME_ALIGN, 0);
            assert_eq!(buf.len(), len);
            let payload_len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
            assert_eq!(len, HEADER_LEN + pad16(payload_len));
            assert!(buf[HEADER_LEN + payload_len..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn every_single_bit_flip_in_header_or_payload_is_detected() {
        let r = Record::SessionSubscribe {
            client_id: "client".into(),
            filter: "a/+/#".into(),
            options: 2,
            subscription_id: Some(9),
            group: None,
        };
        let mut buf = Vec::new();
        encode(&mut buf, 42, &r).unwrap();
        let payload_len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
        for byte in 0..HEADER_LEN + payload_len {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[byte] ^= 1 << bit;
                let seg = aligned(&b);
                assert!(
                    matches!(decode(&seg, 0), Decoded::Bad(_)),
                    "flip of byte {byte} bit {bit} not detected"
                );
            }
        }
    }

    #[test]
    fn crc_mismatch_is_reported_as_such() {
        let mut buf = Vec::new();
        encode(&mut buf, 1, &Record::RetainedClear { topic: "t".into() }).unwrap();
        buf[HEADER_LEN] ^= 0x10;
        let seg = aligned(&buf);
        assert!(matches!(
            decode(&seg, 0),
            Decoded::Bad(BadFrame::Crc { .. })
        ));
    }

    #[test]
    fn group_start_mark_keeps_the_frame_valid() {
        let mut buf = Vec::new();
        encode(&mut buf, 5, &Record::RetainedClear { topic: "t".into() }).unwrap();
        mark_group_start(&mut buf);
        let seg = aligned(&buf);
        assert!(matches!(
            decode(&seg, 0),
            Decoded::Frame {
                lsn: 5,
                group_start: true,
                ..
            }
        ));
        assert_eq!(probe(&seg, 0), Some((5, true)));
    }

    #[test]
    fn zero_bytes_are_empty_and_short_garbage_is_bad() {
        let seg = aligned(&[0u8; 64]);
        assert!(matches!(decode(&seg, 0), Decoded::Empty));
        assert!(matches!(decode(&seg, 56), Decoded::Empty));
        let mut b = [0u8; 64];
        b[60] = 1;
        let seg = aligned(&b);
        assert!(matches!(
            decode(&seg, 56),
            Decoded::Bad(BadFrame::Truncated)
        ));
        // A length running past the end.
        let mut b = [0u8; 32];
        b[0] = 200;
        let seg = aligned(&b);
        assert!(matches!(
            decode(&seg, 0),
            Decoded::Bad(BadFrame::Length(200))
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512), pos in 0usize..600) {
            let seg = aligned(&bytes);
            let _ = decode(&seg, pos / 16 * 16);
            let _ = probe(&seg, pos / 16 * 16);
        }

        #[test]
        fn round_trip_arbitrary_messages(topic in ".{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..300), qos in 0u8..3, lsn in any::<u64>(), expiry in proptest::option::of(any::<u64>())) {
            let r = Record::MessageEnqueued { client_id: "x".into(), msg_id: lsn, message: StoredMessage { topic, qos, retain: false, payload, properties: vec![], expires_at_ms: expiry } };
            let mut buf = vec![0u8; 16];
            let len = encode(&mut buf, lsn, &r).unwrap();
            let seg = aligned(&buf);
            match decode(&seg, 16) {
                Decoded::Frame { lsn: l, record, frame_len, .. } => {
                    prop_assert_eq!(l, lsn);
                    prop_assert_eq!(frame_len, len);
                    prop_assert_eq!(record.to_record().unwrap(), r);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
