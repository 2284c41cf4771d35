//! OpenAI's chat API on the router: the JSON types ([`types`]) and their conversion to and from
//! the router's messages ([`convert`]), shared by the HTTP edge ([`edge`]) and batch input
//! ([`batch_input`]: OpenAI's batch input files, read by `weir batch` and by recurring batches);
//! the mapping of gRPC errors to OpenAI's ([`errors`]).
pub mod batch_input;
pub mod batch_output;
pub mod batches;
pub mod convert;
pub mod edge;
pub mod errors;
pub mod files;
pub mod types;
