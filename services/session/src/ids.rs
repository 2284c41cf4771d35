//! Identifiers: session ids, incarnations and lock tokens, page tokens, message fingerprints.

use std::fmt::Write as _;

use prost::Message as _;
use weir_mesh::ApiError;
use weir_proto::common::Message;

/// Longest session id.
pub const MAX_SESSION_ID_LEN: usize = 128;
/// Prefix of server-chosen session ids.
pub const GENERATED_ID_PREFIX: &str = "s_";
/// Prefix of `ListTurns` page tokens, versioning their format.
const PAGE_TOKEN_PREFIX: &str = "t1.";

/// Whether `id` is a valid session id: 1 to 128 ASCII letters, digits, `-` or `_` (so it is safe
/// inside storage keys).
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Checks the `session_id` field of a request.
pub fn check_session_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::invalid_argument("session_id", "is required"));
    }
    if !valid_session_id(id) {
        return Err(ApiError::invalid_argument(
            "session_id",
            "must be 1 to 128 letters, digits, '-' or '_'",
        ));
    }
    Ok(())
}

/// `bytes` random bytes from the operating system, as lower-case hex.
pub fn random_hex(bytes: usize) -> Result<String, ApiError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| ApiError::internal(format!("no randomness from the OS: {e}")))?;
    Ok(hex(&buf))
}

/// A new server-chosen session id: `s_` and 128 random bits, so ids cannot be guessed.
pub fn new_session_id() -> Result<String, ApiError> {
    Ok(format!("{GENERATED_ID_PREFIX}{}", random_hex(16)?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The page token that continues after `seq`.
pub fn encode_page_token(seq: i64) -> String {
    format!("{PAGE_TOKEN_PREFIX}{seq:x}")
}

/// The sequence number a page token continues after, or `None` if it is not a page token.
pub fn decode_page_token(token: &str) -> Option<i64> {
    let hex = token.strip_prefix(PAGE_TOKEN_PREFIX)?;
    if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    i64::from_str_radix(hex, 16).ok().filter(|seq| *seq >= 0)
}

/// Fingerprint of an append's messages (FNV-1a, 64 bits, over their protobuf encoding), to tell
/// a retry from a `request_id` reused for other messages. Written out rather than taken from
/// `std`, whose hasher may change between releases while fingerprints live in Redis.
pub fn fingerprint(messages: &[Message]) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut hash = OFFSET;
    for message in messages {
        for byte in message.encode_length_delimited_to_vec() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        assert!(valid_session_id("abc-DEF_123"));
        for bad in ["", "a:b", "a b", "é", &"a".repeat(129)] {
            assert!(!valid_session_id(bad), "{bad:?}");
        }
        let id = new_session_id().unwrap_or_default();
        assert!(valid_session_id(&id) && id.len() == 34, "{id}");
        assert_ne!(new_session_id().ok(), Some(id));
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        for seq in [0, 1, 255, i64::MAX] {
            assert_eq!(decode_page_token(&encode_page_token(seq)), Some(seq));
        }
        for bad in [
            "",
            "t1.",
            "t1.xyz",
            "12",
            "t1.-1",
            "t2.10",
            "t1.ffffffffffffffffff",
        ] {
            assert_eq!(decode_page_token(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_tell_messages_apart() {
        let a = Message {
            content: "a".to_string(),
            ..Message::default()
        };
        let b = Message {
            content: "b".to_string(),
            ..Message::default()
        };
        assert_eq!(
            fingerprint(&[a.clone(), b.clone()]),
            fingerprint(&[a.clone(), b.clone()])
        );
        assert_ne!(fingerprint(&[a.clone(), b.clone()]), fingerprint(&[b, a]));
    }
}
