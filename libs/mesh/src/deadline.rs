//! The caller's deadline, as gRPC carries it: the `grpc-timeout` request header.
//!
//! gRPC sends a deadline as the time *remaining* when the call left the client, `TimeoutValue
//! TimeoutUnit`: one to eight ASCII digits followed by `H` (hours), `M` (minutes), `S` (seconds),
//! `m` (milliseconds), `u` (microseconds) or `n` (nanoseconds), e.g. `250m` or `30S`. A server
//! turns it into an absolute deadline as soon as the call arrives (`Instant::now() + remaining`)
//! and bounds everything it does for the call, including calls it makes downstream, by that
//! deadline instead of inventing a fresh timeout.
//!
//! A missing or malformed header means "no deadline" (gRPC's default); callers then apply their
//! own configured cap.

use std::time::Duration;

use tonic::metadata::MetadataMap;

use crate::metadata::GRPC_TIMEOUT;

/// Most digits the gRPC spec allows in a `grpc-timeout` value.
pub const MAX_TIMEOUT_DIGITS: usize = 8;

/// Parses a `grpc-timeout` value such as `100m` or `5S`. Returns `None` for anything the gRPC
/// spec does not allow: no digits, more than [`MAX_TIMEOUT_DIGITS`] digits, a sign, spaces, or an
/// unknown unit.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty()
        || digits.len() > MAX_TIMEOUT_DIGITS
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // At most 8 digits, so the value fits in u64 and hours cannot overflow a Duration.
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(amount * 3600),
        'M' => Duration::from_secs(amount * 60),
        'S' => Duration::from_secs(amount),
        'm' => Duration::from_millis(amount),
        'u' => Duration::from_micros(amount),
        'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The time the caller gave this call, from its `grpc-timeout` metadata; `None` when it set no
/// deadline (or sent a malformed one).
pub fn remaining(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get(GRPC_TIMEOUT)?.to_str().ok()?;
    parse_grpc_timeout(value)
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout("0m"), Some(Duration::ZERO));
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[test]
    fn rejects_what_the_spec_does_not_allow() {
        for value in [
            "",
            "m",
            "S5",
            "123456789m",
            "-5S",
            "+5S",
            " 5S",
            "5 S",
            "5s",
            "5",
            "5ms",
            "1.5S",
            "5é",
            "٣S",
        ] {
            assert_eq!(parse_grpc_timeout(value), None, "{value:?}");
        }
    }

    #[test]
    fn remaining_reads_the_metadata() {
        let mut metadata = MetadataMap::new();
        assert_eq!(remaining(&metadata), None);
        metadata.insert(GRPC_TIMEOUT, MetadataValue::from_static("1500m"));
        assert_eq!(remaining(&metadata), Some(Duration::from_millis(1500)));
        metadata.insert(GRPC_TIMEOUT, MetadataValue::from_static("soon"));
        assert_eq!(remaining(&metadata), None);
    }
}
