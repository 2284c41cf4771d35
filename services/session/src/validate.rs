//! Request validation. Each check returns INVALID_ARGUMENT with a BadRequest violation naming the
//! protobuf field (`messages[2].role`, `ttl`, `metadata["k"]`) and saying what is expected.

use std::{collections::HashMap, time::Duration};

use weir_mesh::ApiError;
use weir_proto::common::{Message, Role};

use crate::config::{Config, MIN_TTL};

/// Most metadata entries per session.
pub const MAX_METADATA_ENTRIES: usize = 32;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_BYTES: usize = 64;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_BYTES: usize = 1024;
/// Longest user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Longest `request_id`, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// `user_id`: at most 256 bytes, no control characters; `required` for DeleteUserSessions.
pub fn user_id(user: &str, required: bool) -> Result<(), ApiError> {
    if user.is_empty() {
        return if required {
            Err(ApiError::invalid_argument("user_id", "is required"))
        } else {
            Ok(())
        };
    }
    if user.len() > MAX_USER_ID_BYTES || user.chars().any(char::is_control) {
        return Err(ApiError::invalid_argument(
            "user_id",
            format!("must be at most {MAX_USER_ID_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

/// `ttl`: unset or zero means the default; otherwise between 1 s and `max_ttl`.
pub fn ttl(ttl: Option<&prost_types::Duration>, config: &Config) -> Result<Duration, ApiError> {
    let Some(ttl) = ttl else {
        return Ok(config.default_ttl);
    };
    if ttl.seconds == 0 && ttl.nanos == 0 {
        return Ok(config.default_ttl);
    }
    let valid = u64::try_from(ttl.seconds)
        .ok()
        .zip(u32::try_from(ttl.nanos).ok().filter(|n| *n < 1_000_000_000))
        .map(|(s, n)| Duration::new(s, n))
        .filter(|d| *d >= MIN_TTL && *d <= config.max_ttl);
    valid.ok_or_else(|| {
        ApiError::invalid_argument(
            "ttl",
            format!(
                "must be between {}s and {}s (0 for the default)",
                MIN_TTL.as_secs(),
                config.max_ttl.as_secs()
            ),
        )
    })
}

/// `metadata`: at most 32 entries, keys 1 to 64 bytes, values at most 1024 bytes.
pub fn metadata(metadata: &HashMap<String, String>) -> Result<(), ApiError> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(ApiError::invalid_argument(
            "metadata",
            format!(
                "at most {MAX_METADATA_ENTRIES} entries, got {}",
                metadata.len()
            ),
        ));
    }
    let mut keys: Vec<&String> = metadata.keys().collect();
    keys.sort();
    for key in keys {
        if key.is_empty() || key.len() > MAX_METADATA_KEY_BYTES {
            return Err(ApiError::invalid_argument(
                format!("metadata[{key:?}]"),
                format!("keys must be 1 to {MAX_METADATA_KEY_BYTES} bytes"),
            ));
        }
        if metadata[key].len() > MAX_METADATA_VALUE_BYTES {
            return Err(ApiError::invalid_argument(
                format!("metadata[{key:?}]"),
                format!("values must be at most {MAX_METADATA_VALUE_BYTES} bytes"),
            ));
        }
    }
    Ok(())
}

/// `messages`: 1 to `max_turns_per_append`, each with a known role other than unspecified and at
/// most `max_message_bytes` of content and tool call arguments.
pub fn messages(messages: &[Message], config: &Config) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_argument(
            "messages",
            "at least one message is required",
        ));
    }
    if messages.len() > config.max_turns_per_append {
        return Err(ApiError::invalid_argument(
            "messages",
            format!(
                "at most {} messages per append, got {}",
                config.max_turns_per_append,
                messages.len()
            ),
        ));
    }
    for (i, message) in messages.iter().enumerate() {
        match Role::try_from(message.role) {
            Ok(Role::Unspecified) | Err(_) => {
                return Err(ApiError::invalid_argument(
                    format!("messages[{i}].role"),
                    format!(
                        "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL, got {}",
                        message.role
                    ),
                ));
            }
            Ok(_) => {}
        }
        let size = message.content.len()
            + message.name.len()
            + message.tool_call_id.len()
            + message
                .tool_calls
                .iter()
                .map(|c| c.id.len() + c.name.len() + c.arguments_json.len())
                .sum::<usize>();
        if size > config.max_message_bytes {
            return Err(ApiError::invalid_argument(
                format!("messages[{i}]"),
                format!(
                    "is {size} bytes; at most {} are stored per message",
                    config.max_message_bytes
                ),
            ));
        }
    }
    Ok(())
}

/// `request_id`: empty, or at most 256 bytes without control characters.
pub fn request_id(id: &str) -> Result<(), ApiError> {
    if id.len() > MAX_REQUEST_ID_BYTES || id.chars().any(char::is_control) {
        return Err(ApiError::invalid_argument(
            "request_id",
            format!("must be at most {MAX_REQUEST_ID_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(result: Result<impl Sized, ApiError>) -> String {
        result
            .err()
            .and_then(|e| e.field_violations().first().map(|(f, _)| f.clone()))
            .unwrap_or_default()
    }

    #[test]
    fn messages_name_the_bad_field() {
        let config = Config::default();
        assert_eq!(field(messages(&[], &config)), "messages");
        let good = Message {
            role: Role::User.into(),
            content: "hi".into(),
            ..Message::default()
        };
        let unspecified = Message {
            content: "hi".into(),
            ..Message::default()
        };
        assert!(messages(std::slice::from_ref(&good), &config).is_ok());
        assert_eq!(
            field(messages(&[good.clone(), unspecified], &config)),
            "messages[1].role"
        );
        let unknown = Message {
            role: 99,
            ..good.clone()
        };
        assert_eq!(field(messages(&[unknown], &config)), "messages[0].role");
        let huge = Message {
            content: "x".repeat(config.max_message_bytes + 1),
            ..good.clone()
        };
        assert_eq!(field(messages(&[huge], &config)), "messages[0]");
        let many = vec![good; config.max_turns_per_append + 1];
        assert_eq!(field(messages(&many, &config)), "messages");
    }

    #[test]
    fn ttl_bounds() {
        let config = Config::default();
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(ttl(None, &config).ok(), Some(config.default_ttl));
        assert_eq!(ttl(Some(&d(0, 0)), &config).ok(), Some(config.default_ttl));
        assert_eq!(
            ttl(Some(&d(2, 0)), &config).ok(),
            Some(Duration::from_secs(2))
        );
        for bad in [d(-1, 0), d(0, 5), d(0, -1), d(i64::MAX, 0)] {
            assert_eq!(field(ttl(Some(&bad), &config)), "ttl", "{bad:?}");
        }
    }

    #[test]
    fn metadata_and_ids() {
        let mut map = HashMap::new();
        map.insert("k".to_string(), "v".to_string());
        assert!(metadata(&map).is_ok());
        map.insert(String::new(), "v".to_string());
        assert_eq!(field(metadata(&map)), "metadata[\"\"]");
        let many: HashMap<String, String> =
            (0..33).map(|i| (i.to_string(), String::new())).collect();
        assert_eq!(field(metadata(&many)), "metadata");
        assert!(user_id("", false).is_ok());
        assert_eq!(field(user_id("", true)), "user_id");
        assert_eq!(field(user_id("a\nb", false)), "user_id");
        assert!(user_id("alice@example.com", true).is_ok());
        assert_eq!(field(request_id(&"r".repeat(300))), "request_id");
    }
}
