//! OpenAI's chat API on the router: the JSON types ([`types`]) and their conversion to and from
//! the router's messages ([`convert`]), shared by the HTTP edge ([`edge`]) and batch input; the
//! mapping of gRPC errors to OpenAI's ([`errors`]).
pub mod convert;
pub mod edge;
pub mod errors;
pub mod types;
