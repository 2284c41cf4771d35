//! How important a request is, so an overloaded server knows what to refuse first.
//!
//! Criticality travels in the `weir-criticality` metadata ([`crate::metadata::CRITICALITY`]) with
//! one of four values, from the most to the least important:
//!
//! | value | meaning | shed |
//! |---|---|---|
//! | `CRITICAL_PLUS` | user-facing and revenue-critical; must not be shed | last |
//! | `CRITICAL` | interactive traffic; **the default when the header is missing** | |
//! | `SHEDDABLE_PLUS` | can be retried later without much harm | |
//! | `SHEDDABLE` | batch and background work | first |
//!
//! The values are Google's (SRE book, "Handling Overload"): a small fixed set that every service
//! understands is better than free-form priorities, because a request's criticality must mean the
//! same thing at every hop. A missing header means CRITICAL so that traffic from clients that know
//! nothing of criticality keeps its latency; batch jobs opt in to being shed by saying SHEDDABLE.
//!
//! A header with any other value is refused with INVALID_ARGUMENT naming the header rather than
//! silently treated as CRITICAL: a typo in a batch job (`SHEDABLE`) would otherwise promote the
//! whole job above interactive traffic's protection.
//!
//! The server-side admission layer ([`crate::admission`]) parses the header once and stores the
//! result in the request's extensions; handlers read it back with [`Criticality::of`] and pass it
//! on to the calls they make with [`Criticality::set_on`], so a request keeps its criticality
//! across the mesh.

use std::{fmt, str::FromStr};

use http::{HeaderMap, HeaderValue};
use tonic::metadata::{MetadataMap, MetadataValue};
use weir_proto::common::Criticality as ProtoCriticality;

use crate::{error::ApiError, metadata::CRITICALITY};

/// How important a request is. The derived order puts the most important first:
/// `CriticalPlus < Critical < SheddablePlus < Sheddable`, so "shed everything `>= x`" reads
/// naturally.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Criticality {
    /// Must not be shed: user-facing and revenue-critical.
    CriticalPlus,
    /// Interactive traffic; the default.
    #[default]
    Critical,
    /// Can be retried later without much harm.
    SheddablePlus,
    /// Batch and background work: shed first.
    Sheddable,
}

/// A `weir-criticality` value that is not one of the four names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown criticality {0:?}: expected CRITICAL_PLUS, CRITICAL, SHEDDABLE_PLUS or SHEDDABLE")]
pub struct UnknownCriticality(pub String);

impl From<UnknownCriticality> for ApiError {
    fn from(error: UnknownCriticality) -> Self {
        ApiError::invalid_argument(CRITICALITY, error.to_string())
    }
}

impl Criticality {
    /// Every value, most important first.
    pub const ALL: [Criticality; 4] = [
        Self::CriticalPlus,
        Self::Critical,
        Self::SheddablePlus,
        Self::Sheddable,
    ];

    /// The metadata value: `CRITICAL_PLUS`, `CRITICAL`, `SHEDDABLE_PLUS` or `SHEDDABLE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CriticalPlus => "CRITICAL_PLUS",
            Self::Critical => "CRITICAL",
            Self::SheddablePlus => "SHEDDABLE_PLUS",
            Self::Sheddable => "SHEDDABLE",
        }
    }

    /// The criticality named by the `weir-criticality` header, CRITICAL when it is absent, and
    /// INVALID_ARGUMENT (naming the header) when it is anything else.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        match headers.get(CRITICALITY) {
            None => Ok(Self::default()),
            Some(value) => parse_value(value.as_bytes()),
        }
    }

    /// [`Criticality::from_headers`] for tonic metadata (in a handler or interceptor).
    pub fn from_metadata(metadata: &MetadataMap) -> Result<Self, ApiError> {
        match metadata.get(CRITICALITY) {
            None => Ok(Self::default()),
            Some(value) => parse_value(value.as_bytes()),
        }
    }

    /// The criticality the admission layer stored in a request's extensions, if it ran.
    pub fn of(extensions: &http::Extensions) -> Option<Criticality> {
        extensions.get::<Criticality>().copied()
    }

    /// Sets the `weir-criticality` metadata of an outgoing call, replacing any value.
    pub fn set_on<T>(self, request: &mut tonic::Request<T>) {
        self.insert_into_metadata(request.metadata_mut());
    }

    /// Sets the `weir-criticality` entry of `metadata`, replacing any value.
    pub fn insert_into_metadata(self, metadata: &mut MetadataMap) {
        metadata.insert(CRITICALITY, MetadataValue::from_static(self.as_str()));
    }

    /// Sets the `weir-criticality` header of an outgoing HTTP request (tower client layers).
    pub fn insert_into_headers(self, headers: &mut HeaderMap) {
        headers.insert(CRITICALITY, HeaderValue::from_static(self.as_str()));
    }

    /// The criticality of a protobuf enum value; `None` for `CRITICALITY_UNSPECIFIED` (the
    /// metadata, or the default, then applies) and for values this build does not know.
    pub fn from_proto(value: i32) -> Option<Self> {
        match ProtoCriticality::try_from(value).ok()? {
            ProtoCriticality::Unspecified => None,
            ProtoCriticality::CriticalPlus => Some(Self::CriticalPlus),
            ProtoCriticality::Critical => Some(Self::Critical),
            ProtoCriticality::SheddablePlus => Some(Self::SheddablePlus),
            ProtoCriticality::Sheddable => Some(Self::Sheddable),
        }
    }
}

fn parse_value(bytes: &[u8]) -> Result<Criticality, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| UnknownCriticality(String::from_utf8_lossy(bytes).into_owned()))?;
    Ok(text.parse::<Criticality>()?)
}

impl FromStr for Criticality {
    type Err = UnknownCriticality;

    /// Parses the metadata names, ignoring ASCII case and surrounding spaces, and also accepts the
    /// protobuf names (`CRITICALITY_SHEDDABLE`) so a value copied from the API works.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let upper = text.trim().to_ascii_uppercase();
        let name = upper.strip_prefix("CRITICALITY_").unwrap_or(&upper);
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == name)
            .ok_or_else(|| UnknownCriticality(text.to_string()))
    }
}

impl fmt::Display for Criticality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Criticality> for ProtoCriticality {
    fn from(value: Criticality) -> Self {
        match value {
            Criticality::CriticalPlus => Self::CriticalPlus,
            Criticality::Critical => Self::Critical,
            Criticality::SheddablePlus => Self::SheddablePlus,
            Criticality::Sheddable => Self::Sheddable,
        }
    }
}

impl From<Criticality> for i32 {
    fn from(value: Criticality) -> Self {
        ProtoCriticality::from(value).into()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn order_is_most_important_first() {
        let mut all = Criticality::ALL;
        all.reverse();
        all.sort();
        assert_eq!(all, Criticality::ALL);
        assert!(Criticality::CriticalPlus < Criticality::Sheddable);
    }

    #[test]
    fn missing_header_is_critical() {
        assert_eq!(
            Criticality::from_headers(&HeaderMap::new()).ok(),
            Some(Criticality::Critical)
        );
        assert_eq!(
            Criticality::from_metadata(&MetadataMap::new()).ok(),
            Some(Criticality::Critical)
        );
    }

    #[test]
    fn every_name_round_trips_through_headers_and_proto() {
        for c in Criticality::ALL {
            let mut headers = HeaderMap::new();
            c.insert_into_headers(&mut headers);
            assert_eq!(Criticality::from_headers(&headers).ok(), Some(c));
            let mut request = tonic::Request::new(());
            c.set_on(&mut request);
            assert_eq!(Criticality::from_metadata(request.metadata()).ok(), Some(c));
            assert_eq!(Criticality::from_proto(i32::from(c)), Some(c));
        }
        assert_eq!(Criticality::from_proto(0), None);
        assert_eq!(Criticality::from_proto(99), None);
        assert_eq!(" sheddable_plus ".parse(), Ok(Criticality::SheddablePlus));
        assert_eq!("CRITICALITY_SHEDDABLE".parse(), Ok(Criticality::Sheddable));
    }

    #[test]
    fn unknown_value_is_invalid_argument_naming_the_header() {
        let mut headers = HeaderMap::new();
        headers.insert(CRITICALITY, HeaderValue::from_static("SHEDABLE"));
        let error = Criticality::from_headers(&headers).err();
        assert_eq!(
            error.as_ref().map(ApiError::code),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            error
                .as_ref()
                .and_then(|e| e.field_violations().first())
                .map(|(field, _)| field.as_str()),
            Some(CRITICALITY)
        );
    }
}
